"""quantize_activations around torch.compile'd blocks (fullgraph=True, context outside)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agoq import ActivationPlan, QuantSpec, quantize_activations
from agoq.activations import context as ctx_mod
from agoq.memory import compiled_saved_bytes
from agoq.models.llama import build

VOCAB = 256


def _setup(backend: str, dtype=torch.float32):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build("tiny", dim=128, n_layers=2, vocab_size=VOCAB).to(dtype)
    tokens = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _step(model, tokens, plan):
    model.zero_grad(set_to_none=True)
    if plan is None:
        loss = _loss(model, tokens)
    else:
        with quantize_activations(plan):
            loss = _loss(model, tokens)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _compile_blocks(model, backend):
    for layer in model.layers.values():
        layer.compile(backend=backend, fullgraph=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_no_graph_break_no_recompile_and_close_gradients(backend, monkeypatch):
    from torch._dynamo.utils import counters

    model, tokens = _setup(backend)
    ref = _step(model, tokens, None)
    eager_packs = []
    real = ctx_mod.ActivationContext._pack
    monkeypatch.setattr(
        ctx_mod.ActivationContext,
        "_pack",
        lambda self, t, *a: eager_packs.append(1) or real(self, t, *a),
    )
    plan = ActivationPlan.agoq(min_numel=0)
    _step(model, tokens, plan)  # eager count, for comparison
    n_eager = len(eager_packs)
    _compile_blocks(model, backend)
    counters.clear()
    grads = [_step(model, tokens, plan) for _ in range(3)]
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # both blocks share one graph, no recompile
    # Inside compiled blocks no Python pack runs: only the eager parts (head, loss) pack.
    per_step = (len(eager_packs) - n_eager) / 3
    assert 0 < per_step < n_eager / 3
    rel = {n: ((grads[-1][n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
    assert max(rel.values()) < 0.35, rel
    assert all(torch.equal(grads[0][n], grads[2][n]) for n in ref)
    if backend != "aot_eager":
        return  # the guards are dynamo's: one backend shows it, without another compile
    # The module hooks leave with the context and come back under the same keys: a step
    # outside adds one graph (no hooks), the next steps inside reuse the first.
    plain = _step(model, tokens, None)  # unquantized: the compiled plain graph
    for n in ref:
        torch.testing.assert_close(plain[n], ref[n], rtol=1e-4, atol=1e-5)
    again = [_step(model, tokens, plan) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] <= 2
    assert all(torch.equal(again[-1][n], grads[0][n]) for n in ref)


def test_compiled_keep_plan_is_exact():
    model, tokens = _setup("aot_eager")
    _compile_blocks(model, "aot_eager")
    ref = _step(model, tokens, None)
    got = _step(model, tokens, ActivationPlan.keep_all())
    assert all(torch.equal(ref[n], got[n]) for n in ref)


def test_compiled_stored_bytes_really_shrink():
    model, tokens = _setup("inductor")
    _compile_blocks(model, "inductor")
    plan = ActivationPlan.agoq(min_numel=0)
    base_loss = _loss(model, tokens)
    base = compiled_saved_bytes(base_loss, model)
    with quantize_activations(plan):
        loss = _loss(model, tokens)
    quant = compiled_saved_bytes(loss, model)
    assert quant < 0.45 * base, (quant, base)
    loss.backward()
    base_loss.backward()


def test_compiled_uniform_spec_and_bf16():
    model, tokens = _setup("aot_eager", torch.bfloat16)
    _compile_blocks(model, "aot_eager")
    plan = ActivationPlan.agoq(min_numel=0, compiled=QuantSpec(bits=8))
    got = _step(model, tokens, plan)
    assert all(torch.isfinite(g.float()).all() for g in got.values())


def _wrap_forwards_in_closures(model):
    """What torchtitan 0.3's ``Module.parallelize`` does to every module with a sharding
    config: ``module.forward`` becomes a closure over the bound original."""
    for mod in model.modules():
        if mod is model:
            continue
        mod.forward = _closure_over(mod.forward)


def _closure_over(fn):
    def forward_with_redistribution(*args, **kwargs):
        return fn(*args, **kwargs)

    return forward_with_redistribution


def test_compiled_paths_through_forward_closures_keep_their_kinds():
    """Under compile, module paths through a wrapped forward read
    ``attention.forward.__closure__[0].cell_contents.__self__.wq``: agoq must still find
    the kinds (it quantized nothing there before: 2.3x the bytes)."""
    plan = ActivationPlan.agoq(min_numel=0)
    stored = {}
    for wrapped in (False, True):
        model, tokens = _setup("aot_eager")
        if wrapped:
            _wrap_forwards_in_closures(model)
        _compile_blocks(model, "aot_eager")
        base_loss = _loss(model, tokens)
        base = compiled_saved_bytes(base_loss, model)
        with quantize_activations(plan):
            loss = _loss(model, tokens)
        stored[wrapped] = compiled_saved_bytes(loss, model)
        assert stored[wrapped] < 0.45 * base, (wrapped, stored[wrapped], base)
        loss.backward()
        base_loss.backward()
    assert stored[True] == stored[False], stored


def test_module_path_normalises_dynamo_sources():
    from agoq.activations.hooks import module_path

    assert module_path("L['self'].layers['0'].attention.wq") == "layers.0.attention.wq"
    closure = "L['fn'].__self__.attention.forward.__closure__[0].cell_contents.__self__.wo"
    assert module_path(closure) == "attention.wo"
    nested = "L['self'].a.forward.__closure__[1].cell_contents.b.forward.__closure__[0].cell_contents.__self__.c"
    assert module_path(nested) == "a.b.c"
