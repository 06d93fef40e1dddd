"""The numerics guard in torchtitan's [agoq] section (``numerics_check_every``): the
converter checks one micro-batch per due step with the gradient torchtitan's loss brought to
the model output, without changing the run. The 2-rank DDP run (gradient buckets too) is in
tests/test_torchtitan_ext.py.
Skipped without torchtitan."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # torchtitan_ext/ sits at the repository root
    sys.path.insert(0, str(ROOT))

from torchtitan_runs import require_torchtitan  # noqa: E402

require_torchtitan("0.2.")  # the 0.2.2 adapter's guard

import torch  # noqa: E402

import agoq  # noqa: E402

DEBUG_TOML = ROOT / "torchtitan_ext" / "debug_model.toml"


def _job(*args: str):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--job.config_file", str(DEBUG_TOML), *args])


class _Dims:
    """The ParallelDims attributes the converter reads (single process, no parallelism)."""

    dp_replicate = dp_shard = pp = tp = cp = 1
    dp_enabled = dp_replicate_enabled = fsdp_enabled = pp_enabled = tp_enabled = False


def _model():
    from torchtitan.models.llama3 import Transformer, llama3_args

    torch.manual_seed(0)
    args = copy.deepcopy(llama3_args["debugmodel"])
    args.n_layers, args.max_seq_len = 2, 64
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    return model, args


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().logsumexp(-1).mean()


def _train(model, conv, tokens, steps: int) -> list[float]:
    """What torchtitan's train step does: forward, loss outside the model, backward,
    optimizer step (whose post hook is the converter's)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        loss = _loss(model(tokens))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if conv is not None:
            conv.post_optimizer_hook([model])
        losses.append(loss.item())
    return losses


def test_converter_checks_activations_and_leaves_the_run_alone() -> None:
    from torchtitan_ext.converter import AgoqConverter

    base, args = _model()
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    conv_plain = AgoqConverter(_job(), _Dims())
    conv_plain.convert(plain)
    conv = AgoqConverter(_job("--agoq.numerics_check_every", "2"), _Dims())
    conv.convert(watched)

    # The output gradient the step-0 check uses: for logsumexp(-1).mean() it is
    # softmax / (batch * seq), computed here independently of agoq.
    with torch.no_grad():
        logits0 = watched(tokens)  # no_grad: the converter leaves this forward alone
    cotangent = torch.softmax(logits0.float(), -1) / (2 * 64)
    losses = _train(watched, conv, tokens, 1)  # SGD is stateless: 1 + 2 steps = 3 steps
    after_step0 = copy.deepcopy(watched.state_dict())
    losses += _train(watched, conv, tokens, 2)
    assert losses == _train(plain, conv_plain, tokens, 3)  # bitwise: the check changed nothing
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)

    (part,) = conv._parts.values()
    hist = part.guard.history["activations"]
    assert [s for s, _ in hist] == [0, 2]

    # Independent value of the step-0 check (run after step 0's update): the vjp of that
    # output gradient, plain fp32 vs under the part's plan, on an unconverted model.
    ref, _ = _model()
    ref.load_state_dict(after_step0)
    params = list(ref.parameters())
    g_ref = torch.autograd.grad((ref(tokens) * cotangent).sum(), params)
    with agoq.quantize_activations(part.ctx.plan):
        out = ref(tokens)
    g_q = torch.autograd.grad((out * cotangent).sum(), params)
    num = sum((q.double() - r.double()).square().sum() for q, r in zip(g_q, g_ref, strict=True))
    den = sum(r.double().square().sum() for r in g_ref)
    expected = math.sqrt(num / den)
    assert 0 < expected < 0.5
    assert hist[0][1] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("action", ["raise", "fallback"])
def test_converter_guard_acts_on_a_bad_plan(action: str) -> None:
    from torchtitan_ext.converter import AgoqConverter

    model, args = _model()
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    job = _job(
        "--agoq.numerics_check_every", "1", "--agoq.numerics_action", action,
        "--agoq.activations", "uniform", "--agoq.activation_bits", "2",
    )  # fmt: skip
    conv = AgoqConverter(job, _Dims())
    conv.convert(model)
    if action == "raise":
        with pytest.raises(agoq.NumericsError, match=r"at step 0: activations.*exceeds threshold"):
            _train(model, conv, tokens, 1)
        return
    with pytest.warns(RuntimeWarning, match="full precision"):
        _train(model, conv, tokens, 1)
    (part,) = conv._parts.values()
    switched = {n.split("/", 1)[1] for n in part.guard.fallbacks}
    assert switched and all(part.ctx.plan.action(k) == "keep" for k in switched)
    assert part.ctx.plan.action("attn_internals") != "keep" or "attn_internals" in switched


# The 2-replica DDP run with the guard on is part of
# tests/test_torchtitan_ext.py::test_two_processes_ddp_with_error_feedback (one torchrun less).
