"""A rank SIGKILLed inside the int8 comm hook mid-step: every other rank raises within a
bounded time, far below the process group's timeout (issue 10). 3 gloo ranks."""

from __future__ import annotations

import time

import pytest
from grad_workers import dead_rank

from agoq.spawn import run_ranks

PG_TIMEOUT = 300  # run_ranks' process-group timeout: detection must not wait for it
BOUND = 30  # seconds from the first step to the survivors' error
WALL = 150  # the whole test, 3 process spawns on a loaded 2-core machine included


def test_survivors_raise_quickly_when_a_rank_is_killed_mid_step(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(dead_rank, 3, 1, str(tmp_path), timeout=PG_TIMEOUT)
    took = time.monotonic() - t0
    msg = str(info.value)
    assert "ranks [1] exited without a result" in msg, msg[:2000]
    for r in (0, 2):
        outcome = (tmp_path / f"rank{r}.txt").read_text()
        assert outcome.startswith("raised after"), (r, outcome)
        assert float(outcome.split()[2].rstrip("s:")) < BOUND, outcome
    assert not (tmp_path / "rank1.txt").exists()  # the victim never got to report
    assert took < WALL < PG_TIMEOUT, f"{took:.1f}s: the survivors waited for a timeout"
