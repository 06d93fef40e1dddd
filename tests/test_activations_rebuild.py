"""Module-level rebuild on a model no rule names: hand-written norms and activations.

The model here is written the way most codebases write a LLaMA layer (RMSNorm spelt out with
fp32 casts, SiLU as ``x * sigmoid(x)``) under names no agoq rule knows. Gradients are
checked against the unquantized run; the stored bytes against what the paper's plan stores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agoq import ActivationPlan, QuantSpec, quantize_activations

DIM, HEADS, HIDDEN, VOCAB = 64, 4, 176, 128


class HandNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.scale * h.to(dtype)


class Swish(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sigmoid(z)


class Mixer(nn.Module):  # attention, under names no rule knows
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(DIM, DIM, bias=False)
        self.b = nn.Linear(DIM, DIM, bias=False)
        self.c = nn.Linear(DIM, DIM, bias=False)
        self.d = nn.Linear(DIM, DIM, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = h.shape
        q, k, v = (p(h).view(bsz, seq, HEADS, -1).transpose(1, 2) for p in (self.a, self.b, self.c))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.d(o.transpose(1, 2).reshape(bsz, seq, DIM))


class Gated(nn.Module):  # SwiGLU MLP
    def __init__(self) -> None:
        super().__init__()
        self.p1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.p2 = nn.Linear(DIM, HIDDEN, bias=False)
        self.p3 = nn.Linear(HIDDEN, DIM, bias=False)
        self.f = Swish()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.p3(self.f(self.p1(h)) * self.p2(h))


class Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n1, self.mix, self.n2, self.ff = HandNorm(DIM), Mixer(), HandNorm(DIM), Gated()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mix(self.n1(h))
        return h + self.ff(self.n2(h))


class Net(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.units = nn.ModuleList(Unit() for _ in range(n))
        self.fin = HandNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.emb(tok)
        for u in self.units:
            h = u(h)
        return self.head(self.fin(h))


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def _tok(batch: int = 2, seq: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _grads(net, tok, plan=None, autocast=False, inside=False):
    net.zero_grad(set_to_none=True)
    ctx = quantize_activations(plan) if plan is not None else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if ctx is not None:
            with ctx:
                logits = net(tok[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tok[:, 1:].reshape(-1))
                if inside:
                    loss.backward()
        else:
            logits = net(tok[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tok[:, 1:].reshape(-1))
    if not inside:
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}, ctx


def _rel(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b))
    den = math.sqrt(sum(float(b[n].double().pow(2).sum()) for n in b))
    return num / den


INT8 = ActivationPlan.agoq(bits=8, format="int")


@pytest.mark.parametrize("inside", [False, True])
def test_hand_written_layer_gets_the_paper_plan(inside):
    net, tok = _net(), _tok()
    ref, _ = _grads(net, tok)
    keep, _ = _grads(net, tok, ActivationPlan.keep_all())
    assert all(torch.equal(ref[n], keep[n]) for n in ref)
    # 8-bit storage: the rebuild itself must add no error beyond the codec's.
    got8, ctx8 = _grads(net, tok, INT8, inside=inside)
    assert _rel(got8, ref) < 0.02
    got4, ctx = _grads(net, tok, ActivationPlan.agoq(), inside=inside)
    assert _rel(got4, ref) < 0.2
    kinds = ctx.report.by_kind()
    # No rule names these modules: the kinds come from what they compute.
    for k in ("attn_proj_input", "mlp_up_input", "mlp_down_input", "lm_head_input"):
        assert kinds[k].stored_bytes == 0 and kinds[k].modes["recomputed"] > 0, k
    assert kinds["norm_input"].modes["quantized"] == 5  # n1, n2 of 2 units, fin
    assert kinds["swiglu_input"].modes["quantized"] == 4  # p1 and p2 outputs, 2 units
    # The out-projection's input is attention's output: quantized, or (a view of what
    # attention keeps, as the CPU kernel lays it out) stored once, kept.
    out_in = kinds["attn_out_input"]
    assert out_in.modes.get("quantized", 0) + out_in.modes.get("dedup", 0) == 2
    # Nothing in the model fell through unrecognised (the loss's logits are "other").
    assert not [
        f for (f, k), r in ctx.report.rows.items() if k == "other" and f.startswith("units")
    ]
    # Every tensor a hand-written norm saves inside is replayed (0 bytes), none kept.
    for fqn, row in ctx.report.by_fqn().items():
        if fqn.endswith(("n1", "n2", "fin")):
            assert row.modes.get("kept", 0) == 0, (fqn, row)
    # Per unit: 2 norm inputs + gate/up (2 x HIDDEN/DIM) + attention out, at ~4.25 bits,
    # plus attention internals kept (q, k, v, out, logsumexp): in U = tokens x DIM x 4 B.
    u = 2 * 63 * DIM * 4
    unit = ctx.report.total("units.1.").stored_bytes / u
    base = ActivationPlan.keep_all()
    _, ctx_base = _grads(net, tok, base)
    assert unit < 0.3 * ctx_base.report.total("units.1.").stored_bytes / u


def test_replay_that_saves_differently_raises():
    class Moody(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(DIM))
            self.extra = False

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
            return torch.tanh(y) if self.extra else y

    norm = Moody()
    x = torch.randn(4, 16, DIM, requires_grad=True)
    with quantize_activations(ActivationPlan.agoq()) as ctx:
        out = norm(x)
        loss = (out * torch.randn_like(out)).sum()
    assert ctx.report.by_kind()["norm_input"].modes["recomputed"] > 0
    norm.extra = True  # the forward now saves another tensor: the replay must not pass
    with pytest.raises(RuntimeError, match="saved .* tensors for backward"):
        loss.backward()


def test_module_drawing_random_numbers_is_not_rebuilt_and_rng_untouched():
    class NoisyNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(DIM))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
            return F.dropout(y, 0.1, training=True)

    x = torch.randn(4, 16, DIM, requires_grad=True)
    torch.manual_seed(5)
    ref = NoisyNorm()(x)
    after_ref = torch.get_rng_state()
    torch.manual_seed(5)
    with quantize_activations(ActivationPlan.agoq()) as ctx:
        got = NoisyNorm()(x)
    assert torch.equal(torch.get_rng_state(), after_ref)  # the probe drew nothing
    assert torch.equal(got, ref)
    modes = ctx.report.total().modes
    assert modes.get("recomputed", 0) == 0


def test_autocast_replay_matches_unquantized_autocast():
    net, tok = _net(), _tok()
    ref, _ = _grads(net, tok, autocast=True)
    got, ctx = _grads(net, tok, INT8, autocast=True)
    assert _rel(got, ref) < 0.03
    assert ctx.report.by_kind()["attn_proj_input"].modes["recomputed"] > 0


def test_in_place_change_of_a_rebuilt_norm_input_raises():
    norm = HandNorm(DIM)
    x0 = torch.randn(4, 16, DIM, requires_grad=True)
    x = x0 * 1.0
    with quantize_activations(ActivationPlan.agoq()):
        y = norm(x)
    loss = (y * y).sum()
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_retain_graph_replays_twice():
    net, tok = _net(), _tok()
    with quantize_activations(INT8):
        logits = net(tok[:, :-1])
    loss = logits.float().pow(2).mean()
    g1 = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_module_with_keyword_arguments_is_not_rebuilt():
    class KwNorm(HandNorm):
        def forward(self, h: torch.Tensor, gain: float = 1.0) -> torch.Tensor:  # type: ignore[override]
            return super().forward(h) * gain

    norm = KwNorm(DIM)
    x = torch.randn(4, 16, DIM, requires_grad=True)
    with quantize_activations(ActivationPlan.agoq()) as ctx:
        y = norm(x, gain=2.0)  # a replay of forward(x) would miss gain: not rebuilt
    assert ctx.report.total().modes.get("recomputed", 0) == 0
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    (norm(ref, gain=2.0)).sum().backward()
    assert torch.allclose(x.grad, ref.grad, rtol=0.2, atol=1e-2)


def test_spec_bits_hold_for_rebuilt_internals():
    """Where a norm's input is kept (the plan says so), its replayed internals are exact."""
    net, tok = _net(), _tok()
    ref, _ = _grads(net, tok)
    plan = ActivationPlan.agoq()
    spec8 = QuantSpec(bits=8, format="int")
    kinds = {**plan.kinds, "norm_input": "keep", "embedding_output": "keep"}
    for k in ("swiglu_input", "attn_out_input", "qk_norm_input", "attn_probs"):
        kinds[k] = "keep"
    exact = ActivationPlan(kinds=kinds, recompute=True, fallback=spec8)
    got, ctx = _grads(net, tok, exact)
    assert ctx.report.total().modes["recomputed"] > 0
    assert _rel(got, ref) < 1e-5


def test_in_place_activation_module_is_not_rebuilt():
    """ReLU(inplace=True) modifies its input: rebuilding it from a stored copy would make
    the input's own version check fail; it is left to autograd's usual saves."""
    lin = nn.Linear(DIM, DIM)
    act = nn.ReLU(inplace=True)
    x = torch.randn(8, 64, DIM)
    ref_in = x.clone()
    lin.zero_grad()
    act(lin(ref_in)).pow(2).sum().backward()
    ref = lin.weight.grad.clone()
    lin.zero_grad()
    with quantize_activations(INT8) as ctx:
        y = act(lin(x))
    y.pow(2).sum().backward()
    assert ctx.report.total().modes.get("recomputed", 0) == 0
    assert torch.allclose(lin.weight.grad, ref, rtol=0.02, atol=1e-3 * ref.abs().max().item())


def test_module_with_its_own_hooks_is_not_rebuilt():
    """A replay runs forward() only: a module whose own hooks change its input (as tensor
    parallel's do) would be replayed on the wrong tensor, so it is not rebuilt."""
    norm = HandNorm(DIM)
    norm.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    x = torch.randn(4, 16, DIM, requires_grad=True)
    with quantize_activations(INT8) as ctx:
        y = norm(x)
    assert ctx.report.total().modes.get("recomputed", 0) == 0
    (y * y.detach()).sum().backward()
    ref = x.detach().clone().requires_grad_()
    y_ref = norm(ref)
    (y_ref * y_ref.detach()).sum().backward()
    assert torch.allclose(x.grad, ref.grad, rtol=0.05, atol=1e-3 * ref.grad.abs().max().item())


def test_nan_in_a_rebuilt_norm_input_reaches_the_gradients():
    norm = HandNorm(DIM)
    x = torch.randn(4, 16, DIM)
    x[1, 3, 5] = float("nan")
    x.requires_grad_()
    with quantize_activations(ActivationPlan.agoq()) as ctx:
        y = norm(x)
    assert ctx.report.total().modes["recomputed"] > 0
    (y.nan_to_num() * torch.randn_like(y)).sum().backward()
    assert torch.isnan(norm.scale.grad).any()
    assert torch.isnan(x.grad[1, 3]).all() and torch.isfinite(x.grad[0]).all()


def test_context_made_every_step_probes_once():
    from agoq.activations import rebuild

    net, tok = _net(), _tok()
    calls = []
    real = rebuild.role_of

    def counting(module, x):
        calls.append(type(module).__name__)
        return real(module, x)

    rebuild.role_of = counting
    try:
        for _ in range(3):
            _grads(net, tok, ActivationPlan.agoq())
    finally:
        rebuild.role_of = real
    # HandNorm x 5, Swish x 2 (plus the other leaves once each) probed in the first step only
    assert calls.count("HandNorm") == 5 and calls.count("Swish") == 2


def test_held_bytes_after_forward_match_the_report():
    """Nothing agoq records holds tensors beyond what the report counts (a recipe of a cast
    once held rotary's q alive: 1.5x the reported bytes). Checked with torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from agoq.models.llama import build

    torch.manual_seed(0)
    model = build("tiny", dim=128, n_layers=2, vocab_size=VOCAB).bfloat16()
    tok = _tok(batch=2, seq=129)
    mt = MemTracker()
    mt.track_external(model)
    with mt:
        with quantize_activations(ActivationPlan.agoq()) as ctx:
            logits = model(tok[:, :-1])
        snap = mt.get_tracker_snapshot()
    held = sum(v for k, v in snap[torch.device("cpu")].items() if "ACT" in str(k))
    expected = ctx.report.stored_bytes + logits.nbytes
    assert abs(held - expected) <= 0.02 * expected, (held, expected)


def test_replays_leave_nothing_alive_across_steps():
    """A replay's own graph must die with it: a saved output packed as itself would be a
    reference cycle inside autograd (invisible to Python's collector), a leak per call."""
    import gc

    net, tok = _net(), _tok()

    def live() -> int:
        gc.collect()
        return sum(
            1
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and not isinstance(o, nn.Parameter)
        )

    _grads(net, tok, ActivationPlan.agoq())
    before = live()
    for _ in range(3):
        _grads(net, tok, ActivationPlan.agoq())
    assert live() <= before + 2  # the last step's gradients replace the first's
