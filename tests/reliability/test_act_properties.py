"""Property test (issue 10): random sequences of what training loops do with one reused
context never give a gradient further from the exact one than the codec's bound.

The model is a chain of bias-free Linear layers, so the bound is exact arithmetic: the
gradient flowing down needs only the weights (kept), and each weight gradient
``dW_i = dh_i^T h_{i-1}`` sees only the int8 error of its saved input ``h_{i-1}``, at most
half a step of that element's block, ``absmax(block) / 127 / 2``. The reference is fp64.
"""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import agoq
from agoq import ActivationPlan, QuantSpec

D, N, LAYERS, BLOCK = 32, 16, 3, 32
SPEC = QuantSpec(bits=8, format="int", block=BLOCK)
ACTIONS = ["step", "retain", "double", "inplace", "free", "dtype", "reassign"]


def _bound(h: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of |dW_quantized - dW| for dW = dh^T h with h stored in SPEC."""
    flat = h.reshape(-1, BLOCK).abs()  # rows of D = BLOCK elements: one block each
    err = (flat.amax(dim=1, keepdim=True) / 127 / 2 * (1 + 1e-5)).expand_as(flat)
    err = err.reshape(h.shape)
    fp32 = 2e-6 * (dh.abs().T @ h.abs())  # fp32 accumulation of the product itself
    return dh.abs().T @ err + fp32 + 1e-30


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(LAYERS))
        with torch.no_grad():
            for lin in self.layers:
                lin.weight.copy_(torch.randn(D, D, generator=g) / D**0.5)
        self.register_buffer("c", torch.randn(N, D, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = lin(x)
        return (x * self.c).sum()


def _reference(model: Chain, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp64 (dW_i, bound_i) of every layer, from the model's current weights and input."""
    ws = [lin.weight.detach().double() for lin in model.layers]
    hs = [x.detach().double()]
    for w in ws:
        hs.append(hs[-1] @ w.T)
    dh = model.c.double()
    out = []
    for i in reversed(range(LAYERS)):
        out.append((dh.T @ hs[i], _bound(hs[i], dh)))
        dh = dh @ ws[i]
    return out[::-1]


def _check(model: Chain, x: torch.Tensor, times: int = 1) -> None:
    exact = x.dtype == torch.float64  # the codec never takes fp64: stored untouched
    for lin, (ref, bound) in zip(model.layers, _reference(model, x), strict=True):
        got = lin.weight.grad.double()
        tol = (1e-10 * ref.abs() + 1e-300) if exact else bound * times
        assert ((got - times * ref).abs() <= tol).all(), (got - times * ref).abs().max()
    model.zero_grad(set_to_none=True)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.lists(st.sampled_from(ACTIONS), min_size=2, max_size=6), st.integers(0, 2**16))
def test_random_step_sequences_stay_within_the_codec_bound(actions, seed):
    model = Chain()
    ctx = agoq.quantize_activations(ActivationPlan.uniform(SPEC, include_other=True, min_numel=0))
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32
    buf = torch.empty(N, D, dtype=dtype)  # one input buffer refilled in place every step
    for action in actions:
        buf.copy_(torch.randn(N, D, generator=g) * float(torch.rand((), generator=g) * 10 + 0.1))
        if action == "dtype":
            dtype = torch.float64 if dtype == torch.float32 else torch.float32
            model.to(dtype)
            buf = buf.to(dtype)
            action = "step"
        if action == "reassign":  # a rebuilt buffer: must stay exact (it is c in dL/dh)
            model.c = torch.randn(N, D, generator=g, dtype=dtype)
            action = "step"
        with ctx:
            loss = model(buf)
        if action == "step":
            loss.backward()
            _check(model, buf)
        elif action == "retain":
            loss.backward(retain_graph=True)
            loss.backward()
            _check(model, buf, times=2)
        elif action == "double":  # a gradient penalty through the same graph
            xi = buf.clone().requires_grad_(True)
            with ctx:
                out = model(xi)
            (gx,) = torch.autograd.grad(out, xi, create_graph=True)
            pen = gx.pow(2).sum()
            pen.backward()
            # gx = c W3 W2 W1 needs only weights: its gradient is exact up to fp32 rounding.
            ws = [lin.weight.detach().double() for lin in model.layers]
            w = ws[0].clone()
            for wi in ws[1:]:
                w = wi @ w
            gref = model.c.double() @ w
            assert torch.allclose(gx.double(), gref, rtol=1e-4, atol=1e-6)
            model.zero_grad(set_to_none=True)
            del loss
        elif action == "inplace":
            buf.add_(1)  # the first layer saved buf: backward must refuse
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
            model.zero_grad(set_to_none=True)
        elif action == "free":
            del loss  # a graph dropped without backward (an eval step, a skipped batch)
        loss = out = pen = gx = xi = None
        gc.collect()
        assert ctx.report.live_bytes == 0, action
