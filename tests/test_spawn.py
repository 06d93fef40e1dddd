"""agoq.spawn.run_ranks: a rank that dies is a clear error, never a hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from agoq.spawn import run_ranks


def _one_rank_dies(rank: int, world: int) -> float:
    if rank == 1:
        os._exit(3)  # killed before the collective, without reporting
    t = torch.ones(4)
    dist.all_reduce(t)  # rank 0 waits for a peer that is gone
    return float(t.sum())


def _sum(rank: int, world: int) -> float:
    t = torch.full((2,), float(rank + 1))
    dist.all_reduce(t)
    return float(t[0])


def test_results_in_rank_order() -> None:
    assert run_ranks(_sum, 2) == [3.0, 3.0]


def test_a_dead_rank_is_named_and_the_rest_do_not_hang() -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_one_rank_dies, 2, timeout=20)
    message = str(info.value)
    assert "ranks [1] exited without a result" in message and "3" in message
    assert "rank 0:" in message  # the survivor's collective failed and says so
    assert time.monotonic() - t0 < 20 + 40


def _env(rank: int, world: int) -> str | None:
    return os.environ.get("AGOQ_TEST_SPAWN_ENV")


def test_ranks_see_the_callers_environment_of_now(monkeypatch) -> None:
    """Ranks fork from a server started at the first call: they must still see environment
    variables set after it started, as spawned processes would."""
    run_ranks(_sum, 2)  # the fork server is running from here on
    monkeypatch.setenv("AGOQ_TEST_SPAWN_ENV", "set-later")
    assert run_ranks(_env, 2) == ["set-later", "set-later"]
    monkeypatch.delenv("AGOQ_TEST_SPAWN_ENV")
    assert run_ranks(_env, 2) == [None, None]
