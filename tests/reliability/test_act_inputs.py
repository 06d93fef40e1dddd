"""Bad input to the activation entry points: a clear error naming the problem (issue 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import agoq
from agoq import ActivationPlan


@pytest.mark.parametrize("plan", ["agoq", 4, {"preset": "agoq"}, agoq.QuantSpec()])
def test_quantize_activations_wants_a_plan(plan):
    with pytest.raises(TypeError, match="ActivationPlan"):
        agoq.quantize_activations(plan)


def test_plan_replaced_by_something_else_is_refused_at_enter():
    ctx = agoq.quantize_activations(ActivationPlan.agoq())
    ctx.plan = "keep"
    with pytest.raises(TypeError, match="ActivationPlan"):
        ctx.__enter__()
    ctx.plan = ActivationPlan.keep_all()  # and the context is usable again
    with ctx:
        pass


def test_nested_entry_of_one_context_is_refused():
    ctx = agoq.quantize_activations()
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()
    with ctx:  # exited cleanly: enterable again
        pass


def test_plan_replaced_between_steps_takes_effect():
    lin = nn.Linear(64, 64)
    x = torch.randn(128, 64, requires_grad=True)
    plan = ActivationPlan.uniform(agoq.QuantSpec(), include_other=True, min_numel=0)
    ctx = agoq.quantize_activations(plan)
    with ctx:
        lin(x * 1.0).sum().backward()
    quantized = ctx.report.stored_bytes
    ctx.report.clear()
    ctx.plan = ActivationPlan.keep_all()
    with ctx:
        lin(x * 1.0).sum().backward()
    assert ctx.report.stored_bytes > quantized


def test_exception_inside_the_context_leaves_no_hooks_behind():
    ctx = agoq.quantize_activations(ActivationPlan.uniform(agoq.QuantSpec(), min_numel=0))
    with pytest.raises(ValueError, match="boom"):
        with ctx:
            raise ValueError("boom")
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    lin(x * 1.0).sum().backward()  # outside: plain autograd, nothing recorded
    assert ctx.report.stored_bytes == 0


@pytest.mark.parametrize("stage", [None, "stage", 3])
def test_quantize_stage_wants_a_stage_or_module(stage):
    with pytest.raises(TypeError, match="PipelineStage or a module"):
        agoq.quantize_stage(stage, "1f1b", 4)


@pytest.mark.parametrize(
    "args", [(-1, 4), (4, 4), (True, 4), (0, 0)], ids=["negative", "past", "bool", "none"]
)
def test_for_stage_rejects_bad_indices(args):
    with pytest.raises((ValueError, TypeError)):
        ActivationPlan.agoq().for_stage(*args)


def test_replaced_plan_keeps_the_kinds_of_a_model_already_seen():
    """A new plan (e.g. the numerics guard's fallback) must resolve the same kinds by FQN:
    ``attention.wo`` is attn_out_input only through its FQN, never through its class."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wo = nn.Linear(64, 64)

        def forward(self, x):
            return self.wo(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attn()

        def forward(self, x):
            return self.attention(x)

    block = Block()
    x = torch.randn(128, 64, requires_grad=True)
    ctx = agoq.quantize_activations(ActivationPlan.agoq(min_numel=0))
    with ctx:
        block(x * 1.0).sum().backward()
    first = set(ctx.report.by_kind())
    ctx.report.clear()
    ctx.plan = ActivationPlan.agoq(min_numel=0, recompute=False)  # a new plan object
    with ctx:
        block(x * 1.0).sum().backward()
    assert "attn_out_input" in first
    assert set(ctx.report.by_kind()) == first
