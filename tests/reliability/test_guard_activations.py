"""NumericsGuard.check_activations on the live run: it finds the kind a bad plan stores too
coarsely, switches exactly that kind to "keep" (or raises naming it), ignores non-finite
steps, and never perturbs the training run it watches.

Errors are checked against an independent reference: fp32 gradients of the same loss
computed by plain PyTorch (no agoq context), and the quantized gradient computed with a
plain ``loss.backward()`` under the context, compared here with torch math.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import agoq
from agoq.models.llama import build
from agoq.quant import QuantSpec
from agoq.train import next_token_loss

THRESHOLD = 0.15  # activation threshold of these tests (tiny model at init)
BAD = QuantSpec(bits=2, format="int", block=128)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build("tiny", max_seq_len=64)


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(seed))


def _bad_plan() -> agoq.ActivationPlan:
    """The paper's plan, but attention internals stored at 2 bits."""
    plan = agoq.ActivationPlan.agoq()
    return dataclasses.replace(plan, kinds={**plan.kinds, "attn_internals": BAD})


def _independent_rel_err(
    model: nn.Module, tokens: torch.Tensor, plan: agoq.ActivationPlan
) -> float:
    """||g_q - g|| / ||g||: g from plain fp32 PyTorch, g_q from a backward under the context."""
    ref_model, q_model = copy.deepcopy(model), copy.deepcopy(model)
    next_token_loss(ref_model, tokens).backward()
    with agoq.quantize_activations(plan):
        loss = next_token_loss(q_model, tokens)
    loss.backward()
    num = den = 0.0
    for r, q in zip(ref_model.parameters(), q_model.parameters(), strict=True):
        num += (q.grad.double() - r.grad.double()).square().sum().item()
        den += r.grad.double().square().sum().item()
    return math.sqrt(num / den)


def test_bad_kind_is_found_and_switched_to_keep() -> None:
    model, tokens = _model(), _tokens()
    plan = _bad_plan()
    expected = _independent_rel_err(model, tokens, plan)
    assert expected > THRESHOLD  # the setup really is bad
    good = dataclasses.replace(plan, kinds={**plan.kinds, "attn_internals": "keep"})
    expected_good = _independent_rel_err(model, tokens, good)
    assert expected_good < THRESHOLD

    lines: list[str] = []
    guard = agoq.NumericsGuard(every=1, activation_threshold=THRESHOLD, log=lines.append)
    ctx = agoq.quantize_activations(plan)
    with pytest.warns(RuntimeWarning, match="activations/attn_internals.*full precision"):
        errs = guard.check_activations(0, ctx, model, lambda: next_token_loss(model, tokens))
    assert errs["activations"] == pytest.approx(expected, rel=1e-4)
    assert errs["activations/attn_internals"] > THRESHOLD
    assert all(errs[f"activations/{k}"] <= THRESHOLD for k in ("norm_input", "swiglu_input"))
    # Exactly that kind switched, in the user's context, nothing else of the plan changed.
    assert guard.fallbacks == {"activations/attn_internals"}
    assert ctx.plan == dataclasses.replace(plan, kinds={**plan.kinds, "attn_internals": "keep"})
    assert any("activations/attn_internals" in line for line in lines)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next check is quiet
        errs = guard.check_activations(1, ctx, model, lambda: next_token_loss(model, tokens))
    assert errs == {"activations": pytest.approx(expected_good, rel=1e-4)}
    assert errs["activations"] < THRESHOLD
    assert [s for s, _ in guard.history["activations"]] == [0, 1]


def test_good_plan_triggers_nothing_and_checks_only_when_due() -> None:
    model, tokens = _model(), _tokens()
    plan = agoq.ActivationPlan.agoq()
    guard = agoq.NumericsGuard(every=3, activation_threshold=THRESHOLD, action="raise")
    ctx = agoq.quantize_activations(plan)
    calls = []

    def loss_fn() -> torch.Tensor:
        calls.append(1)
        return next_token_loss(model, tokens)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = [guard.check_activations(s, ctx, model, loss_fn) for s in range(4)]
    assert [bool(r) for r in results] == [True, False, False, True]
    assert len(calls) == 4  # two passes per due check, no attribution below threshold
    assert results[0]["activations"] == pytest.approx(
        _independent_rel_err(model, tokens, plan), rel=1e-4
    )
    assert results[0]["activations"] < THRESHOLD
    assert ctx.plan is plan and not guard.fallbacks


def test_raise_names_the_kind() -> None:
    model, tokens = _model(), _tokens()
    guard = agoq.NumericsGuard(every=1, activation_threshold=THRESHOLD, action="raise")
    ctx = agoq.quantize_activations(_bad_plan())
    with pytest.raises(agoq.NumericsError, match=r"activations/attn_internals relative error"):
        guard.check_activations(0, ctx, model, lambda: next_token_loss(model, tokens))
    assert ctx.plan == _bad_plan()


def test_everything_at_2_bits_switches_the_bad_kinds_only() -> None:
    model, tokens = _model(), _tokens()
    plan = agoq.ActivationPlan.uniform(BAD)
    guard = agoq.NumericsGuard(every=1, activation_threshold=THRESHOLD)
    ctx = agoq.quantize_activations(plan)
    with pytest.warns(RuntimeWarning):
        errs = guard.check_activations(0, ctx, model, lambda: next_token_loss(model, tokens))
    over = {n.split("/")[1] for n, e in errs.items() if "/" in n and e > THRESHOLD}
    assert over and {n.split("/")[1] for n in guard.fallbacks} == over
    for kind in agoq.activations.KINDS:
        assert ctx.plan.action(kind) == ("keep" if kind in over else plan.action(kind))


def test_non_finite_step_is_recorded_never_acts() -> None:
    model, tokens = _model(), _tokens()
    guard = agoq.NumericsGuard(every=1, activation_threshold=1e-9, action="raise")
    ctx = agoq.quantize_activations(_bad_plan())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errs = guard.check_activations(
            0, ctx, model, lambda: next_token_loss(model, tokens) * float("nan")
        )
    assert math.isnan(errs["activations"]) and list(errs) == ["activations"]
    assert math.isnan(guard.history["activations"][0][1])
    assert not guard.fallbacks and ctx.plan == _bad_plan()


class _Noisy(nn.Module):
    """Tiny LLaMA with dropout and a BatchNorm: RNG draws and buffer updates per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.llama = build("tiny", max_seq_len=64)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm1d(256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.drop(self.llama(tokens))
        return self.bn(logits.transpose(1, 2)).transpose(1, 2)


def _train(guard: agoq.NumericsGuard | None, steps: int = 4) -> tuple[list[float], nn.Module]:
    torch.manual_seed(0)
    model = _Noisy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctx = agoq.quantize_activations(agoq.ActivationPlan.agoq())
    losses = []
    for step in range(steps):
        tokens = _tokens(seed=step)
        with ctx:
            loss = next_token_loss(model, tokens)
        loss.backward()
        if guard is not None:
            guard.check_activations(step, ctx, model, lambda t=tokens: next_token_loss(model, t))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    losses.append(torch.rand(()).item())  # the global RNG stream continues unperturbed
    return losses, model


def test_run_with_guard_is_bitwise_identical() -> None:
    guard = agoq.NumericsGuard(every=2, activation_threshold=1e6, action="raise")
    base_losses, base = _train(None)
    losses, watched = _train(guard)
    assert [s for s, _ in guard.history["activations"]] == [0, 2]
    assert all(e > 0 for _, e in guard.history["activations"])  # it did measure something
    assert losses == base_losses
    for (name, a), b in zip(base.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # parameters and BatchNorm statistics


def test_rng_dropout_masks_equal_in_both_passes() -> None:
    """With dropout, the quantized pass must see the reference pass's masks: a plan that
    stores everything as is then measures fp32 noise (different masks: an O(1) error)."""
    torch.manual_seed(0)
    model = _Noisy()
    tokens = _tokens()
    plan = agoq.ActivationPlan(kinds={"norm_input": "keep"}, compiled=QuantSpec(4))
    # compiled= is a spec, so the guard measures; no eager tensor is actually quantized.
    guard = agoq.NumericsGuard(every=1, activation_threshold=1e-4, action="raise")
    before = torch.get_rng_state()
    errs = guard.check_activations(
        0, agoq.quantize_activations(plan), model, lambda: next_token_loss(model, tokens)
    )
    assert list(errs) == ["activations"] and errs["activations"] < 1e-5
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_calls_are_refused() -> None:
    from torch.nn.parallel import DistributedDataParallel

    model, tokens = _model(), _tokens()
    guard = agoq.NumericsGuard(every=1)
    ctx = agoq.quantize_activations(_bad_plan())
    fn = lambda: next_token_loss(model, tokens)  # noqa: E731
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)  # no process group needed
    with pytest.raises(TypeError, match=r"ddp\.module"):
        guard.check_activations(0, ctx, ddp, fn)
    with pytest.raises(TypeError, match="quantize_activations"):
        guard.check_activations(0, _bad_plan(), model, fn)
    with pytest.raises(ValueError, match="scalar"):
        guard.check_activations(0, ctx, model, lambda: model(tokens[:, :-1]))
    with ctx, pytest.raises(RuntimeError, match="outside"):
        guard.check_activations(0, ctx, model, fn)


def test_resumed_guard_reapplies_fallbacks() -> None:
    guard = agoq.NumericsGuard(every=100)
    with pytest.warns(RuntimeWarning):
        guard.observe("activations/attn_internals", 1.0, step=0)
    resumed = agoq.NumericsGuard(every=100)
    resumed.load_state_dict(guard.state_dict())
    ctx = agoq.quantize_activations(_bad_plan())
    model = _model()
    # Not due (step 1): nothing is measured, but the saved fallback applies to ctx.plan.
    assert resumed.check_activations(1, ctx, model, lambda: 1 / 0) == {}
    assert ctx.plan.action("attn_internals") == "keep"
    assert ctx.plan.action("norm_input") == _bad_plan().action("norm_input")


# ------------------------------------------------------------------ agoq.train

TINY = dict(model="tiny", batch=4, seq=32, eval_batches=1)


def test_train_config_runs_the_guard_without_changing_the_run() -> None:
    from agoq.train import TrainConfig, train

    base = train(TrainConfig(steps=3, plan="agoq", **TINY))
    watched = train(TrainConfig(steps=3, plan="agoq", numerics_check_every=2, **TINY))
    assert base.numerics == {}
    assert [s for s, _ in watched.numerics["activations"]] == [0, 2]
    assert all(0 < e < 0.5 for _, e in watched.numerics["activations"])
    assert watched.losses == base.losses  # bitwise: the checks changed nothing
    assert watched.eval_loss == base.eval_loss


@pytest.mark.parametrize(
    ("value", "exc"), [(-1, ValueError), (True, TypeError), (2.0, TypeError), ("10", TypeError)]
)
def test_train_config_refuses_bad_period(value: object, exc: type[Exception]) -> None:
    from agoq.train import TrainConfig

    with pytest.raises(exc, match="numerics_check_every"):
        TrainConfig(numerics_check_every=value, **TINY).validate()  # type: ignore[arg-type]


def test_train_two_ranks_int8_checks_activations_and_buckets() -> None:
    from agoq.train import TrainConfig, train

    cfg = TrainConfig(
        steps=2, plan="agoq", world_size=2, grads="int8", numerics_check_every=1, **TINY
    )
    result = train(cfg)
    base = train(dataclasses.replace(cfg, numerics_check_every=0))
    assert result.losses == base.losses  # DDP's reducer and the int8 hook undisturbed
    assert [s for s, _ in result.numerics["activations"]] == [0, 1]
    grads = {n: v for n, v in result.numerics.items() if n.startswith("grad/bucket")}
    assert grads, result.numerics  # the DDP hook's state got the same guard
    assert all(0 <= e < 0.05 for v in grads.values() for _, e in v)


def test_demo_option_records_the_checks(tmp_path) -> None:
    import json

    from agoq.cli import main

    args = ["demo", "--steps", "2", "--model", "tiny", "--batch", "4", "--seq", "32"]
    assert main([*args, "--numerics-check-every", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    assert [s for s, _ in data["agoq"]["numerics"]["activations"]] == [0, 1]
    assert data["agoq"]["config"]["numerics_check_every"] == 1
    assert data["baseline"]["numerics"] == {}
