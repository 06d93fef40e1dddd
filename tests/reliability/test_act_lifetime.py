"""Failure class 1: lifetime and identity of saved tensors (issue 10).

Each test reproduces a pattern of real training loops that returned wrong gradients (or
crashed) and checks the result against plain fp32/fp64 autograd.
"""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from act_utils import MLP, grads, int8_plan, max_rel, rel
from torch import nn

import agoq
from agoq import ActivationPlan, QuantSpec

INPLACE = "modified by an inplace operation"


# ------------------------------------------------------------------ reused context


def test_context_reused_every_step_with_a_persistent_buffer():
    """A persistent input buffer refilled in place each step must be re-stored each step."""
    model, ref = MLP(seed=0), MLP(seed=0)
    buf = torch.empty(64, 32)  # e.g. a pinned staging buffer reused by the data loader
    ctx = agoq.quantize_activations(int8_plan())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        buf.copy_(torch.randn(64, 32, generator=g) * 3)
        with ctx:
            model(buf).pow(2).mean().backward()
        ref(buf).pow(2).mean().backward()
        got, want = grads(model), grads(ref)
        assert max_rel(got, want) < 0.03  # int8 of every saved tensor: ~1% here
    gc.collect()
    assert ctx.report.live_bytes == 0  # nothing held once the graphs are gone


def test_live_bytes_return_to_zero_with_a_tensor_that_outlives_the_step():
    cache = {}
    model = MLP()
    ctx = agoq.quantize_activations(int8_plan())
    for step in range(2):
        x = torch.randn(64, 32)
        cache[step] = x  # the caller keeps every input alive (a cache, a replay buffer)
        with ctx:
            loss = model(x).sum()
        loss.backward()
        del loss
        gc.collect()
        assert ctx.report.live_bytes == 0


def test_buffer_reassigned_between_steps_is_not_quantized():
    """A module buffer rebuilt between steps (a new mask / RoPE cache) stays exact."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)
            self.register_buffer("mask", torch.rand(64, 32))

        def forward(self, x):
            h = self.lin(x)
            h.retain_grad()
            self.h = h
            return (h * self.mask).sum()  # mul saves the mask for dL/dh

    m = Masked()
    ctx = agoq.quantize_activations(int8_plan())
    for _ in range(3):
        m.mask = torch.rand(64, 32) * 7  # reassigned, not updated in place
        with ctx:
            loss = m(torch.randn(64, 32))
        loss.backward()
        # dL/dh is exactly the mask when the mask is stored untouched.
        assert torch.equal(m.h.grad, m.mask)


# ------------------------------------------------------------------- in-place checks


def _plain_raises(fn) -> None:
    """The same pattern raises in plain PyTorch (sanity for the agoq checks)."""
    with pytest.raises(RuntimeError, match=INPLACE):
        fn(None)


def _inplace_after_save(plan):
    lin = nn.Linear(32, 32)
    x = torch.randn(64, 32, requires_grad=True)
    ctx = agoq.quantize_activations(plan) if plan is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        h = torch.tanh(x * 2)  # tanh saves its output h
        y = lin(h)  # linear saves h too
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    with torch.no_grad():
        h.mul_(3)  # modified after it was saved
    y.sum().backward()


@pytest.mark.parametrize(
    "plan",
    [ActivationPlan.keep_all(), int8_plan(), ActivationPlan.agoq(min_numel=0)],
    ids=["kept", "quantized", "agoq"],
)
def test_inplace_change_of_a_saved_tensor_raises(plan):
    _plain_raises(_inplace_after_save)
    with pytest.raises(RuntimeError, match=INPLACE):
        _inplace_after_save(plan)


def test_inplace_change_of_a_recompute_input_raises():
    """The input of a recomputed RMSNorm output changes in place: the rebuild would be wrong."""
    w = torch.ones(32, requires_grad=True)
    lin = nn.Linear(32, 32)

    def run(plan):
        x = torch.randn(64, 32, requires_grad=True) * 1.0
        x.retain_grad()
        ctx = agoq.quantize_activations(plan) if plan is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            h = F.rms_norm(x, (32,), w)
            y = lin(h)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        with torch.no_grad():
            x.add_(1)
        y.sum().backward()

    _plain_raises(run)
    with pytest.raises(RuntimeError, match=INPLACE):
        run(ActivationPlan.agoq(min_numel=0))


def test_parameter_updated_before_backward_raises():
    """An optimizer step between forward and backward changes a saved weight."""
    lin = nn.Linear(32, 32)
    x = torch.randn(64, 32, requires_grad=True)
    with agoq.quantize_activations(int8_plan()):
        y = lin(x)
    with torch.no_grad():
        lin.weight.add_(1)
    with pytest.raises(RuntimeError, match=INPLACE):
        y.sum().backward()


def test_inplace_before_save_and_retain_graph_are_fine():
    lin = nn.Linear(32, 32)
    ref = nn.Linear(32, 32)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(64, 32)
    x.add_(1)  # before any save: no error
    with agoq.quantize_activations(ActivationPlan.keep_all()):
        y = lin(x)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    ref(x).sum().backward()
    assert torch.allclose(lin.weight.grad, 2 * ref.weight.grad)


# --------------------------------------------------------------- layouts, 2nd order


def test_expanded_saved_tensor():
    """A stride-0 (expanded) saved tensor used to crash the codec's restore."""
    torch.manual_seed(0)
    w = torch.randn(64, 32, requires_grad=True)
    v = torch.randn(64, 1, requires_grad=True)

    def loss_fn():
        e = torch.tanh(v).expand(64, 32)  # stride 0 along dim 1
        return (e * w).sum()  # mul saves e (for dw) and w (for de)

    with agoq.quantize_activations(int8_plan()):
        loss = loss_fn()
    loss.backward()
    got = w.grad.clone()
    w.grad = None
    loss_fn().backward()
    assert rel(got, w.grad) < 0.01


def test_gradient_penalty_with_create_graph():
    """Double backward (a gradient penalty) through quantized saves of ``other``."""
    model, ref = MLP(seed=3), MLP(seed=3)
    x = torch.randn(64, 32)

    def penalty(m, ctx):
        xi = x.clone().requires_grad_(True)
        if ctx is not None:
            with ctx:
                out = m(xi).sum()
                (gx,) = torch.autograd.grad(out, xi, create_graph=True)
                pen = gx.pow(2).sum()
        else:
            out = m(xi).sum()
            (gx,) = torch.autograd.grad(out, xi, create_graph=True)
            pen = gx.pow(2).sum()
        pen.backward()
        return grads(m)

    got = penalty(model, agoq.quantize_activations(int8_plan()))
    want = penalty(ref, None)
    assert max_rel(got, want) < 0.05


# ------------------------------------------------------------------------- threads


def test_module_forward_in_another_thread_does_not_change_labels():
    """Module tracking is per context and per thread: a forward running in another thread
    (an EMA/eval model, a data worker) while the context is active must not relabel saves."""
    entered, done = threading.Event(), threading.Event()

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wo = nn.Linear(32, 32)

        def forward(self, x):
            return self.wo(x)

    class Block(nn.Module):  # "attention.wo" gets its kind from its FQN only
        def __init__(self):
            super().__init__()
            self.attention = Attn()

        def forward(self, x):
            return self.attention(x)

    class Waiter(nn.Module):
        def forward(self, x):
            entered.set()  # now inside a module forward in the other thread
            done.wait(10)
            return x

    plan = ActivationPlan.agoq(min_numel=0)

    def by_kind(report):
        return {k: (r.tensors, r.stored_bytes) for k, r in report.by_kind().items()}

    torch.manual_seed(0)
    block = Block()
    x = torch.randn(64, 32, requires_grad=True)
    with agoq.quantize_activations(plan) as alone:
        block(x).sum().backward()

    waiter = Waiter()
    t = threading.Thread(target=lambda: waiter(torch.zeros(1)))
    with agoq.quantize_activations(plan) as ctx:
        t.start()
        assert entered.wait(10)
        out = block(x)  # the other thread is inside Waiter.forward right now
        done.set()
    t.join(10)
    out.sum().backward()
    assert by_kind(ctx.report) == by_kind(alone.report)
    assert "attn_out_input" in by_kind(ctx.report)


def test_float64_activations_are_kept_exactly():
    """float64 saves are never squeezed through fp32 (1e-50 would become 0)."""
    lin = nn.Linear(8, 8).double()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1e-50, 1e300] * 4, dtype=torch.float64)
    with agoq.quantize_activations(int8_plan()):
        y = lin(x * scale)
    y.sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    lin(x * scale).sum().backward()
    assert torch.equal(got, lin.weight.grad)


def test_same_context_in_two_threads_is_refused():
    ctx = agoq.quantize_activations(ActivationPlan.agoq())
    errors = []
    started = threading.Event()
    release = threading.Event()

    def other():
        with ctx:
            started.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert started.wait(10)
    try:
        with pytest.raises(RuntimeError, match="already active"):
            with ctx:
                pass
    except Exception as e:  # pragma: no cover - reported below
        errors.append(e)
    finally:
        release.set()
        t.join(10)
    assert not errors


def test_quantized_spec_error_bound_holds_per_step():
    """Sanity of the bound used above: int8 blocks of 32 on these inputs give <1% error."""
    lin = nn.Linear(32, 32)
    x = torch.randn(64, 32)
    plan = ActivationPlan.uniform(QuantSpec(bits=8, format="int", block=32), min_numel=0)
    with agoq.quantize_activations(plan):
        y = lin(x)
    y.sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    lin(x).sum().backward()
    assert rel(got, lin.weight.grad) < 0.01


# ---------------------------------------------------------------- global module hooks


def _global_hooks():
    from torch.nn.modules import module as nn_module

    return (
        dict(nn_module._global_forward_pre_hooks),
        dict(nn_module._global_forward_hooks),
        dict(nn_module._global_forward_hooks_always_called),
    )


def test_global_module_hooks_live_only_while_a_context_is_active():
    """Module hooks are process-wide: they must go with the last active context (nested,
    in another thread, after an exception), and a compiled module called afterwards must
    not warn about global hooks."""
    before = _global_hooks()
    plan = ActivationPlan.agoq(min_numel=0)
    model = MLP()
    x = torch.randn(64, 32)
    outer, inner = agoq.quantize_activations(plan), agoq.quantize_activations(plan)
    with outer:
        assert _global_hooks() != before
        with inner:
            pass
        model(x)  # the outer context still follows the modules after the inner exits
    assert _global_hooks() == before
    assert "<no module>" not in {fqn for fqn, _ in outer.report.rows}
    assert "l2" in {fqn for fqn, _ in outer.report.rows}

    with pytest.raises(ValueError, match="boom"):
        with outer:
            raise ValueError("boom")
    assert _global_hooks() == before

    entered, release = threading.Event(), threading.Event()

    def other():
        with agoq.quantize_activations(plan):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert entered.wait(10)
        with outer:
            pass
        assert _global_hooks() != before  # the other thread's context is still active
    finally:
        release.set()
        t.join(10)
    assert _global_hooks() == before

    compiled = torch.compile(nn.Linear(4, 4), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(torch.randn(2, 4))


def test_failed_entry_leaves_nothing_behind(monkeypatch):
    """An error while entering (here: the recipe mode) undoes every step already taken."""
    from agoq.activations import context as ctx_mod

    class Broken:
        def __init__(self, *args):
            pass

        def __enter__(self):
            raise RuntimeError("mode failed")

    before = _global_hooks()
    ctx = agoq.quantize_activations(ActivationPlan.agoq())
    monkeypatch.setattr(ctx_mod, "RecipeMode", Broken)
    with pytest.raises(RuntimeError, match="mode failed"):
        ctx.__enter__()
    assert _global_hooks() == before
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    monkeypatch.undo()
    with ctx:  # not left "already active"
        MLP()(torch.randn(4, 32))
