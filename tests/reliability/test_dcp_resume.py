"""Checkpoint and resume through torch.distributed.checkpoint of the DDP hook state (error
feedback on) and of Int8GradStore (mid-accumulation), 2 gloo ranks: the resumed run is
bitwise identical to the uninterrupted one (issue 10)."""

from __future__ import annotations

import torch
from grad_workers import dcp_rank

from agoq.spawn import run_ranks


def test_dcp_resume_is_bitwise_identical(tmp_path):
    results = run_ranks(dcp_rank, 2, str(tmp_path / "ckpt"), timeout=150)
    for r in results:
        # Something to restore: the store held a micro-batch, the residuals were non-zero,
        # and the rebuilt run started from other weights.
        assert r["held"] > 0 and r["residual_norm"] > 0 and r["differs_before"], r
        assert all(r["equal"]), r["equal"]
    for x, y in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(x, y)  # replicas identical too
