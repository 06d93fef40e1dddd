"""quantize_activations: correctness against unquantized autograd, exact accounting."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agoq
from agoq import ActivationPlan, QuantSpec, quantize_activations
from agoq.activations import context as ctx_mod
from agoq.models.llama import build

VOCAB = 256


def _model(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return build("tiny", dim=64, n_layers=2, vocab_size=VOCAB, **kw).to(dtype)


def _tokens(seed=1, batch=2, seq=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _grads(model, tokens, plan=None, backward_inside=False):
    model.zero_grad(set_to_none=True)
    if plan is None:
        _loss(model, tokens).backward()
        ctx = None
    else:
        with quantize_activations(plan) as ctx:
            loss = _loss(model, tokens)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, ctx


def _rel(a: dict, b: dict) -> dict:
    return {
        n: ((a[n].float() - b[n].float()).norm() / b[n].float().norm().clamp_min(1e-30)).item()
        for n in b
    }


def small_plan(**kw) -> ActivationPlan:
    return ActivationPlan.agoq(min_numel=0, **kw)


# ------------------------------------------------------------------ correctness


def test_keep_all_is_bitwise_identical():
    m, t = _model(), _tokens()
    ref, _ = _grads(m, t)
    got, ctx = _grads(m, t, ActivationPlan.keep_all())
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    assert ctx.report.stored_bytes == ctx.report.original_bytes > 0


@pytest.mark.parametrize("inside", [False, True])
def test_agoq_plan_gradients_close_and_memory_shrinks(inside):
    m, t = _model(), _tokens()
    ref, _ = _grads(m, t)
    got, ctx = _grads(m, t, small_plan(), backward_inside=inside)
    rel = _rel(got, ref)
    assert max(rel.values()) < 0.3, rel
    assert sum(rel.values()) / len(rel) < 0.12
    kinds = ctx.report.by_kind()
    assert kinds["attn_internals"].stored_bytes == kinds["attn_internals"].original_bytes
    for k in ("attn_proj_input", "mlp_up_input", "mlp_down_input", "lm_head_input"):
        assert kinds[k].stored_bytes == 0 and kinds[k].modes["recomputed"] > 0, k
    norm = kinds["norm_input"]
    # Each norm's input (2 norms per layer + the final norm, the first one's input is the
    # embedding output; batch 2 x 31 tokens x dim 64) is quantized; what the norm saves
    # inside is replayed from it (0 bytes).
    assert norm.modes["quantized"] == 4 and norm.modes["kept"] == 0
    assert kinds["embedding_output"].modes["quantized"] == 1
    assert norm.modes["quantized"] + norm.modes["recomputed"] == norm.tensors
    assert 4.0 < 8 * norm.stored_bytes / (4 * 2 * 31 * 64) < 4.3  # fp4 + a scale per 128
    layer = ctx.report.total("layers.")
    assert layer.stored_bytes < 0.45 * layer.original_bytes


def test_recompute_alone_is_exact():
    """Recipes rebuild exactly what forward computed: no quantization -> same gradients."""
    m, t = _model(), _tokens()
    ref, _ = _grads(m, t)
    plan = ActivationPlan(
        kinds={
            k: "recompute"
            for k in ("attn_proj_input", "mlp_up_input", "mlp_down_input", "lm_head_input")
        },
        recompute=True,
        fallback="keep",
        min_numel=0,
    )
    got, ctx = _grads(m, t, plan)
    assert ctx.report.by_kind()["mlp_down_input"].modes["recomputed"] == 2
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=2e-5, atol=2e-6)


def test_uniform_4bit_is_worse_than_agoq():
    m, t = _model(), _tokens()
    ref, _ = _grads(m, t)
    agoq_err = _rel(_grads(m, t, small_plan())[0], ref)
    uni = ActivationPlan.uniform(QuantSpec(bits=4, format="fp4_e2m1"), min_numel=0)
    uni_err = _rel(_grads(m, t, uni)[0], ref)
    assert sum(uni_err.values()) > 1.3 * sum(agoq_err.values())


def test_bf16_model_and_autocast():
    m, t = _model(torch.bfloat16), _tokens()
    got, ctx = _grads(m, t, small_plan())
    assert all(torch.isfinite(g).all() for g in got.values())
    assert ctx.report.stored_bytes < 0.5 * ctx.report.original_bytes
    m32 = _model()
    ref, _ = _grads(m32, t)
    m32.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), quantize_activations(small_plan()) as c2:
        loss = _loss(m32, t)
    loss.backward()
    rel = _rel({n: p.grad for n, p in m32.named_parameters()}, ref)
    assert max(rel.values()) < 0.35, rel
    assert c2.report.stored_bytes < c2.report.original_bytes


# ------------------------------------------------------------------ must-holds


def test_parameters_buffers_and_small_tensors_are_never_quantized(monkeypatch):
    m, t = _model(), _tokens()
    statics = {p.untyped_storage().data_ptr() for p in m.parameters()}
    statics |= {b.untyped_storage().data_ptr() for b in m.buffers()}
    seen = []
    real = ctx_mod.quantize
    monkeypatch.setattr(ctx_mod, "quantize", lambda x, spec: seen.append(x) or real(x, spec))
    plan = ActivationPlan.uniform(QuantSpec(bits=8), include_other=True, min_numel=64)
    _grads(m, t, plan)
    assert seen
    for x in seen:
        assert not isinstance(x, nn.Parameter) and not isinstance(x._base, nn.Parameter)
        assert x.untyped_storage().data_ptr() not in statics
        assert x.is_floating_point() and x.numel() >= 64


def test_tensor_saved_by_q_k_v_is_stored_once():
    m, t = _model(), _tokens()
    _, ctx = _grads(m, t, small_plan(recompute=False))
    proj = ctx.report.by_kind()["attn_proj_input"]
    assert proj.saves == 3 * 2 and proj.tensors == 2 and proj.modes["dedup"] == 4
    up = ctx.report.by_kind()["mlp_up_input"]
    assert up.saves == 2 * 2 and up.tensors == 2


class _Churn(nn.Module):
    """Saves many short-lived temporaries: their storage addresses get reused."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 256, 256) / 16)

    def forward(self, x):
        for i in range(8):
            tmp = torch.tanh(x @ self.w[i])  # tanh saves its output; x@w saves x
            x = tmp * 1.0
            del tmp
        return x.sum()


def test_dedupe_survives_storage_address_reuse():
    torch.manual_seed(0)
    mod = _Churn()
    x = torch.randn(64, 256, requires_grad=True)
    mod(x).backward()
    ref = (x.grad.clone(), mod.w.grad.clone())
    x.grad, mod.w.grad = None, None
    plan = ActivationPlan.uniform(QuantSpec(bits=8), include_other=True, min_numel=0)
    with quantize_activations(plan):
        out = mod(x)
    out.backward()
    for got, want in zip((x.grad, mod.w.grad), ref, strict=True):
        assert ((got - want).norm() / want.norm()).item() < 0.05


def test_unpack_is_idempotent_retain_graph_and_split_backward():
    m, t = _model(), _tokens()
    with quantize_activations(small_plan()):
        loss = _loss(m, t)
    params = [p for p in m.parameters()]
    g1 = torch.autograd.grad(loss, params, retain_graph=True)
    g2 = torch.autograd.grad(loss, params, retain_graph=True)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    # Zero-bubble style: input-gradient pass, then the weight-gradient pass, same graph.
    m.zero_grad()
    with quantize_activations(small_plan()):
        h = m.tok_embeddings(t[:, :-1]).detach().requires_grad_()
        out = h
        cos, sin = m.rope_cos[: t.shape[1] - 1], m.rope_sin[: t.shape[1] - 1]
        for layer in m.layers.values():
            out = layer(out, cos, sin)
        y = out.square().mean()
    (gx,) = torch.autograd.grad(y, [h], retain_graph=True)
    layer_params = [p for layer in m.layers.values() for p in layer.parameters()]
    gw = torch.autograd.grad(y, layer_params)
    with quantize_activations(small_plan()):
        out = h
        for layer in m.layers.values():
            out = layer(out, cos, sin)
        y2 = out.square().mean()
    full = torch.autograd.grad(y2, [h, *layer_params])
    torch.testing.assert_close(gx, full[0])
    for a, b in zip(gw, full[1:], strict=True):
        torch.testing.assert_close(a, b)


def test_packed_memory_is_released_with_the_graph(monkeypatch):
    m, t = _model(), _tokens()
    refs = []
    real = ctx_mod.quantize

    def spy(x, spec):
        p = real(x, spec)
        refs.append(weakref.ref(p.payload))
        return p

    monkeypatch.setattr(ctx_mod, "quantize", spy)
    with quantize_activations(small_plan()):
        loss = _loss(m, t)
    assert refs and all(r() is not None for r in refs)
    loss.backward()
    del loss
    gc.collect()
    assert all(r() is None for r in refs)


def test_several_microbatches_in_flight():
    m = _model()
    t1, t2 = _tokens(1), _tokens(2)
    ref1, _ = _grads(m, t1, small_plan())
    ref2, _ = _grads(m, t2, small_plan())
    m.zero_grad()
    with quantize_activations(small_plan()):
        l1 = _loss(m, t1)
        l2 = _loss(m, t2)
    l1.backward()
    l2.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref1[n] + ref2[n], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_composes():
    from torch.utils.checkpoint import checkpoint

    m, t = _model(), _tokens()
    ref, _ = _grads(m, t)

    class Ckpt(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, cos, sin):
            return checkpoint(self.inner, x, cos, sin, use_reentrant=False)

    for k in list(m.layers.keys()):
        m.layers[k] = Ckpt(m.layers[k])
    got, ctx = _grads(m, t, small_plan())
    rel = _rel(got, {k: ref[k.replace(".inner", "")] for k in got})
    assert max(rel.values()) < 0.3, rel
    # Only what checkpoint saves (the block inputs) reaches the outer hooks.
    assert "attn_internals" not in ctx.report.by_kind()


def test_nan_propagates_to_gradients():
    m, t = _model(), _tokens()
    with torch.no_grad():
        m.tok_embeddings.weight[t[0, 3]] = float("nan")
    got, _ = _grads(m, t, small_plan())
    assert torch.isnan(got["output.weight"]).any()


def test_bad_inputs():
    with pytest.raises(TypeError, match="ActivationPlan"):
        quantize_activations({"bits": 4})
    c = quantize_activations()
    with c, pytest.raises(RuntimeError, match="already active"):
        c.__enter__()


def test_public_api_exports():
    assert agoq.quantize_activations is quantize_activations
    assert isinstance(agoq.ActivationPlan.agoq(), ActivationPlan)


def test_live_and_peak_bytes_follow_the_graph():
    m, t = _model(), _tokens()
    with quantize_activations(small_plan()) as ctx:
        l1 = _loss(m, t)
        one = ctx.report.live_bytes
        l2 = _loss(m, t)
    assert one > 0 and ctx.report.live_bytes == 2 * one == ctx.report.peak_bytes
    l1.backward()
    del l1
    gc.collect()
    assert ctx.report.live_bytes == one
    l2.backward()
    del l2
    gc.collect()
    assert ctx.report.live_bytes == 0 and ctx.report.peak_bytes == 2 * one
