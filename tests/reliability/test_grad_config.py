"""Ranks with different settings, FQN-keyed and validated state, the store's guards
(issue 10, class 3). One 2-rank gloo run for the distributed parts."""

from __future__ import annotations

import pytest
import torch
from grad_workers import config_rank, mismatch_rank
from torch import nn

from agoq.spawn import run_ranks

FIELDS = ("block", "scale_dtype", "rounding", "min_numel", "error_feedback", "guard")


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(config_rank, 2, timeout=150)


@pytest.fixture(scope="module")
def mismatches() -> list[dict]:
    return run_ranks(mismatch_rank, 2, timeout=150)


@pytest.mark.parametrize("field", FIELDS)
def test_different_settings_raise_on_every_rank_naming_the_field(mismatches, field):
    for r in mismatches:
        msg, took = r["mismatch"][field]
        assert "settings differ" in msg and f"{field}:" in msg, msg
        assert "rank 0=" in msg and "rank 1=" in msg, msg
        assert took < 30, took  # the check, not a collective timeout
        # Only the differing field is named.
        others = [f for f in FIELDS if f != field and f"; {f}:" in msg or msg.endswith(f"{f}:")]
        assert not others, msg


def test_fsdp_comm_and_hook_check_settings_too(mismatches):
    for r in mismatches:
        assert "block:" in r["mismatch"]["reduce_scatter_block"][0]
        assert "min_numel:" in r["mismatch"]["fsdp_hook_min_numel"][0]
        assert r["mismatch"]["same_settings"][0] == "", r["mismatch"]["same_settings"]


def test_residuals_follow_parameter_names_not_order(results):
    """Resumed into a model that registers wo before wq: each residual must go back to its
    own parameter, so the next step equals the uninterrupted run."""
    for r in results:
        assert r["fqn"] == {"wq": True, "wo": True}, r["fqn"]


def test_store_fails_loudly_when_ddp_private_flag_is_missing(results):
    for r in results:
        # agoq._compat.TorchCompatError, a RuntimeError naming the feature and tested range.
        assert r["ddp_flag"].startswith("TorchCompatError"), r["ddp_flag"]
        assert "require_forward_param_sync" in r["ddp_flag"]
        assert "Int8GradStore" in r["ddp_flag"] and "tested on torch" in r["ddp_flag"]


# ------------------------------------------------------------- single process


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(4, 4, bias=False)
        self.wo = nn.Linear(4, 4, bias=False)


def test_hook_state_load_validates_everything():
    from agoq.gradients import Int8AllReduceState

    m = Two()
    st = Int8AllReduceState(error_feedback=True, model=m)
    sd = st.state_dict()
    assert sorted(sd["ranks"]["0"]["residuals"]) == ["wo.weight", "wq.weight"]
    with pytest.raises(ValueError, match="lacks"):
        Int8AllReduceState(error_feedback=True, model=m).load_state_dict({})
    with pytest.raises(ValueError, match="block: saved 128, this one 256"):
        Int8AllReduceState(error_feedback=True, block=256, model=m).load_state_dict(sd)
    with pytest.raises(ValueError, match="error_feedback"):
        Int8AllReduceState(model=m).load_state_dict(sd)
    bad = {**sd, "ranks": {"0": {"residuals": {"wq.weight": torch.zeros(4, 4)}}}}
    with pytest.raises(ValueError, match="missing.*wo.weight"):
        Int8AllReduceState(error_feedback=True, model=m).load_state_dict(bad)
    bad = {
        **sd,
        "ranks": {
            "0": {"residuals": {"wq.weight": torch.zeros(16), "wo.weight": torch.zeros(4, 4)}}
        },
    }
    with pytest.raises(ValueError, match="wq.weight"):
        Int8AllReduceState(error_feedback=True, model=m).load_state_dict(bad)
    with pytest.raises(ValueError, match="names are unknown"):
        Int8AllReduceState(error_feedback=True).load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown key"):
        Int8AllReduceState(error_feedback=True, model=m).load_state_dict({**sd, "x": 1})


def test_store_state_is_keyed_by_fqn_and_validated():
    from agoq.gradients import Int8GradStore

    m = Two()
    store = Int8GradStore(m)
    for p in m.parameters():
        p.grad = torch.randn(p.shape)
    store.accumulate()
    sd = store.state_dict()
    assert sorted(sd["ranks"]["0"]["slots"]) == ["wo.weight", "wq.weight"]
    with pytest.raises(ValueError, match="lacks"):
        Int8GradStore(m).load_state_dict({})
    with pytest.raises(ValueError, match="compensation"):
        Int8GradStore(m, compensation="none").load_state_dict(sd)
    other = nn.Module()
    other.wq = nn.Linear(4, 4, bias=False)
    other.w2 = nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match="unexpected.*wo.weight"):
        Int8GradStore(other).load_state_dict(sd)
    small = Two()
    small.wo = nn.Linear(4, 2, bias=False)
    with pytest.raises(ValueError, match="wo.weight"):
        Int8GradStore(small).load_state_dict(sd)
    fresh = Int8GradStore(Two())
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.read(), store.read(), strict=True))


def _grads(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def test_exception_inside_accumulating_does_not_double_the_next_step():
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    from agoq.gradients import Int8GradStore

    store = Int8GradStore(model)
    x1, x2 = torch.randn(4, 16), torch.randn(4, 16)
    # Reference: one clean micro-batch.
    _grads(model, x2)
    ref = model.weight.grad.clone()
    model.zero_grad()
    with pytest.raises(RuntimeError, match="boom"):
        with store.accumulating():
            _grads(model, x1)  # stored
            raise RuntimeError("boom")  # e.g. an OOM in the next micro-batch
    model.zero_grad()  # what a loop does after catching it
    with store.accumulating():
        _grads(model, x2)
    got = model.weight.grad
    assert (got - ref).norm() / ref.norm() < 1e-3  # not ref + grad(x1)


def test_store_zero_grad_clears_an_abandoned_step():
    from agoq.gradients import Int8GradStore

    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    store = Int8GradStore(model)
    _grads(model, torch.randn(4, 16))
    store.accumulate()  # the step is then abandoned
    store.zero_grad()
    assert len(store) == 0 and all(p.grad is None for p in model.parameters())
    x = torch.randn(4, 16)
    _grads(model, x)
    store.accumulate()
    store.materialize()
    model2 = nn.Linear(16, 16)
    model2.load_state_dict(model.state_dict())
    _grads(model2, x)
    assert (model.weight.grad - model2.weight.grad).norm() / model2.weight.grad.norm() < 1e-3
