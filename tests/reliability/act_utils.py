"""Shared helpers of the activation reliability tests: small models and fp64 references."""

from __future__ import annotations

import torch
from torch import nn

INT8 = dict(bits=8, format="int", block=32)


def int8_plan(**kw):
    """Every saved activation (``other`` included) in int8: every save is quantized."""
    from agoq import ActivationPlan, QuantSpec

    return ActivationPlan.uniform(QuantSpec(**INT8), include_other=True, min_numel=0, **kw)


class MLP(nn.Module):
    """Three Linear layers; a hand-written model, not agoq's reference."""

    def __init__(self, d: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2, self.l3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter's gradient, then cleared."""
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``b``, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_rel(a: dict, b: dict) -> float:
    """Largest relative error over the gradients of ``b``."""
    return max(rel(a[n], b[n]) for n in b)
