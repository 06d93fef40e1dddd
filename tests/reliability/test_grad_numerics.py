"""Gradient numerics under real usage: a non-finite step under error feedback, gradients
near the fp32 maximum, float64 (issue 10, classes 3 and 4). One 2-rank gloo run."""

from __future__ import annotations

import pytest
import torch
from grad_workers import numerics_rank

from agoq.spawn import run_ranks


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(numerics_rank, 2, timeout=120)


def test_error_feedback_recovers_after_one_non_finite_step(results):
    for r in results:
        steps = r["ef_steps"]
        # The overflow step itself stays non-finite (GradScaler must see it and skip), in
        # the block that held the Inf only; the other parameter is untouched.
        assert not steps[1]["a_finite"] and steps[1]["a_blocks_bad"] == [300 // 128], steps[1]
        assert steps[1]["b_finite"]
        # Every later step is finite again and as close to the fp32 mean as before.
        for s in steps[2:]:
            assert s["a_finite"] and s["b_finite"], steps
            assert s["a_rel"] < 0.02 and s["b_rel"] < 0.02, s
        assert r["ef_residual_finite"]
    assert results[0]["ef_steps"][3] == results[1]["ef_steps"][3]  # identical replicas


def test_gradients_near_fp32_max_stay_finite_like_ddp_default(results):
    for r in results:
        near = r["near_max"]
        assert near["ddp_default"][0], "reference: DDP's default hook stays finite"
        for path, (finite, err) in near.items():
            assert finite, f"{path} overflowed where DDP's default hook stays finite"
            assert err < 0.01, (path, err)


def test_float64_is_refused_on_every_gradient_path(results):
    for r in results:
        for path, msg in r["float64"].items():
            assert "float64" in msg, f"{path}: float64 not refused ({msg!r})"
            if path != "ddp_hook":  # DDP may rewrap the hook's exception
                assert msg.startswith("TypeError"), (path, msg)


def test_float64_refused_by_the_store():
    from agoq.gradients import Int8GradStore

    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    store = Int8GradStore([p])
    p.grad = torch.full((8,), 1e-50, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        store.accumulate()
