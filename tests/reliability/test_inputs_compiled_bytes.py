"""compiled_saved_bytes under FSDP2 + torch.compile (issue 10, class 4).

With ``reshard_after_forward=True`` FSDP2 frees the unsharded parameters after forward and
the module's parameters are DTensor shards again: the old code read a storage pointer of a
DTensor (``RuntimeError: ... invalid python storage``), which crashed torchtitan's converter
at step 1 with ``--compile.enable`` and FSDP.
"""

from __future__ import annotations

from inputs_fsdp_helpers import compiled_bytes_rank

from dist_utils import run_ranks

DIM, BATCH = 32, 8


def test_compiled_saved_bytes_with_fsdp2_resharded_after_forward():
    results = run_ranks(compiled_bytes_rank, 2, timeout=240)
    # What autograd saves per block, counted by hand: the block input (batch x dim) and
    # relu(up(x)) (batch x 4 dim), fp32; parameters are not activations.
    expected = 2 * (BATCH * DIM + BATCH * 4 * DIM) * 4
    for r in results:
        assert r["plain"] == expected, r
        assert r["reshard=True"] == expected, r
        assert r["reshard=False"] == expected, r
        assert r["grads_finite=True"] and r["grads_finite=False"], r
