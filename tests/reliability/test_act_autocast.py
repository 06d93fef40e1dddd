"""Failure class 2: autocast's weight copies must never be quantized (issue 10).

Under ``torch.autocast`` the low-precision copy of each weight is saved for backward; it
is derived from a parameter, so agoq must store nothing for it and rebuild it exactly.
The reference is the same autocast computation in plain PyTorch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from act_utils import rel
from torch import nn

import agoq
from agoq import ActivationPlan

DTYPES = [torch.bfloat16, torch.float16]
FP4 = agoq.QuantSpec(bits=4, format="fp4_e2m1", block=32)


def _linear_grads(dtype, plan, *, frozen=False):
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    lin.weight.requires_grad_(not frozen)
    x = torch.randn(64, 256, requires_grad=True)

    def run(ctx):
        with torch.autocast("cpu", dtype=dtype):
            if ctx is None:
                y = lin(x)
            else:
                with ctx:
                    y = lin(x)
        y.float().pow(2).sum().backward()
        out = (x.grad.clone(), None if frozen else lin.weight.grad.clone())
        x.grad = None
        lin.weight.grad = None
        return out

    want = run(None)
    ctx = agoq.quantize_activations(plan)
    got = run(ctx)
    return got, want, ctx


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_autocast_weight_copy_is_rebuilt_exactly(dtype, frozen):
    """The input gradient only needs the weight: it must equal plain autocast bitwise."""
    plan = ActivationPlan.uniform(FP4, include_other=True, min_numel=0)
    (gx, gw), (rx, rw), ctx = _linear_grads(dtype, plan, frozen=frozen)
    assert torch.equal(gx, rx), rel(gx, rx)
    if not frozen:  # the weight gradient goes through the 4-bit input: close, not equal
        assert rel(gw, rw) < 0.2
    # The weight copy costs nothing: only the activation is stored.
    stored = ctx.report.stored_bytes
    assert stored < 64 * 256  # the bf16 weight copy alone would be 131072 bytes


def test_autocast_hand_written_layer_error_matches_fp32():
    """A hand-written pre-norm MLP block: agoq's weight-gradient error under autocast is
    no worse than without autocast (the weight copies used to add 4x)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(128))
            self.up = nn.Linear(128, 256, bias=False)
            self.down = nn.Linear(256, 128, bias=False)
            self.out = nn.Linear(128, 64, bias=False)

        def forward(self, x):
            h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
            h = h * self.w
            h = x + self.down(F.silu(self.up(h)))
            return self.out(h)

    def run(autocast, plan):
        torch.manual_seed(0)
        m = Block()
        x = torch.randn(4, 64, 128)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if plan is None:
                y = m(x)
            else:
                with agoq.quantize_activations(plan):
                    y = m(x)
        y.float().pow(2).mean().backward()
        return {n: p.grad.float().clone() for n, p in m.named_parameters()}

    plan = ActivationPlan.uniform(FP4, include_other=True, min_numel=0)
    err_fp32 = max(
        rel(a, b) for a, b in zip(run(False, plan).values(), run(False, None).values(), strict=True)
    )
    err_amp = max(
        rel(a, b) for a, b in zip(run(True, plan).values(), run(True, None).values(), strict=True)
    )
    # 4-bit activations only; bf16 rounding differences stay small next to that.
    assert err_amp < 1.5 * err_fp32, (err_amp, err_fp32)


def test_compiled_autocast_keeps_weight_copies():
    """Under torch.compile the weight casts are graph intermediates: still never quantized."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))  # linear: d/dx needs W only
    x = torch.randn(32, 64, requires_grad=True)
    compiled = torch.compile(model)
    plan = ActivationPlan.uniform(FP4, include_other=True, min_numel=0)

    def input_grad(ctx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if ctx is None:
                y = compiled(x)
            else:
                with ctx:
                    y = compiled(x)
        y.float().sum().backward()  # d/dx needs only the weights
        g = x.grad.clone()
        x.grad = None
        return g

    want = input_grad(None)
    got = input_grad(agoq.quantize_activations(plan))
    assert rel(got, want) < 1e-2  # bf16 rounding only; a 4-bit weight copy gives ~0.07


def test_cast_of_a_transposed_parameter_to_another_layout_is_not_rebuilt_wrongly():
    """A cast that changes the memory layout of a non-contiguous parameter cannot be
    rebuilt from the parameter's own layout: it must be stored, never rebuilt wrongly."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 32).t())  # (32, 64), stored transposed
    x = torch.randn(32, 64, requires_grad=True)

    def run(ctx):
        if ctx is None:
            wc = w.to(torch.bfloat16, memory_format=torch.contiguous_format)
            out = (x.to(torch.bfloat16) * wc).float().sum()
        else:
            with ctx:
                wc = w.to(torch.bfloat16, memory_format=torch.contiguous_format)
                out = (x.to(torch.bfloat16) * wc).float().sum()
        out.backward()  # d/dx is the weight copy itself
        g = x.grad.clone()
        x.grad = None
        w.grad = None
        return g

    want = run(None)
    got = run(agoq.quantize_activations(ActivationPlan.keep_all()))
    assert torch.equal(got, want)
