"""The gradient half of the numerics guard: one bucket per check step is also reduced in
full precision; a bucket int8 cannot represent is switched to full precision, a normal one
is not; action="raise" raises on every rank. One 2-rank gloo run."""

from __future__ import annotations

import pytest
from grad_workers import guard_rank

from agoq.spawn import run_ranks


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(guard_rank, 2, timeout=120)


def test_bad_bucket_switched_to_full_precision_good_bucket_not(results):
    for r in results:
        hist = r["history"]
        assert len(hist) == 2, hist  # round-robin: both buckets were checked
        bad = [k for k, v in hist.items() if max(v) > 0.5]
        good = [k for k, v in hist.items() if max(v) < 0.02]
        assert len(bad) == 1 and len(good) == 1, hist
        assert r["fallbacks"] == bad, r["fallbacks"]
        # From then on the bad parameter is reduced exactly like DDP's default (fp32,
        # divided first); the good one still goes through int8 (close, not exact).
        assert r["bad_exact"]
        assert not r["good_exact"] and r["good_rel"] < 0.02, r["good_rel"]
        assert any("full precision" in w and "grad/bucket" in w for w in r["warnings"]), r[
            "warnings"
        ]
    # The error is measured on reduced (identical) results: every rank decides the same.
    assert results[0]["history"] == results[1]["history"]


def test_action_raise_raises_on_every_rank(results):
    for r in results:
        assert len(r["raised"]) == 1, r["raised"]
        step, msg = r["raised"][0]
        assert "grad/bucket" in msg and "exceeds threshold" in msg, msg
    assert results[0]["raised"] == results[1]["raised"]


def test_numerics_check_every_shortcut_and_bad_guard():
    from agoq.gradients import Int8AllReduceState
    from agoq.guard import NumericsGuard

    st = Int8AllReduceState(numerics_check_every=7)
    assert isinstance(st.guard, NumericsGuard) and st.guard.every == 7
    with pytest.raises(ValueError, match="not both"):
        Int8AllReduceState(numerics_check_every=7, guard=NumericsGuard())
    with pytest.raises(TypeError, match="guard"):
        Int8AllReduceState(guard="yes")
    with pytest.raises(ValueError, match="numerics_check_every"):
        Int8AllReduceState(numerics_check_every=0)
