"""The codec on DTensors (2 gloo ranks): each rank quantizes its shard, dequantize rebuilds
the DTensor (mesh, placements, global shape and stride), within the codec's half-step bound
checked in fp64 on the full tensor, split into shards by torch.chunk (not by DTensor)."""

from __future__ import annotations

import math

import torch

from agoq import QuantSpec, dequantize, quantize
from dist_utils import run_ranks
from quant_reference import local_gap, output_tolerance

SPECS = [
    QuantSpec(bits=4, format="fp4_e2m1", block=128),
    QuantSpec(bits=4, format="int", block=32, scale_dtype=torch.bfloat16),
    QuantSpec(bits=8, format="int", block=64),
]


def _half_step_bound(x: torch.Tensor, y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-element bound of |y - x| for the shard ``x`` (fp64, row-major blocks): half the
    grid interval at x / s, with s the block absmax over the top level, rounded up by at
    most one unit of the scale dtype."""
    xf = x.reshape(-1)
    n = xf.numel()
    blocks = torch.nn.functional.pad(xf.abs(), (0, (-n) % spec.block)).view(-1, spec.block)
    rel = 2.0**-7 if spec.scale_dtype == torch.bfloat16 else 2.0**-22
    s = (blocks.amax(1) / spec.max_level).repeat_interleave(spec.block)[:n]
    v = torch.where(s > 0, xf / s, torch.zeros_like(xf))
    # The codec's scale is >= s, so its |x / scale| <= |v|; the gaps of every grid here
    # never shrink with magnitude, so the gap at v is an upper bound of the one used.
    return 0.5 * local_gap(spec, v) * s * (1 + rel) * (1 + 1e-6) + output_tolerance(y.reshape(-1))


def _shard(full: torch.Tensor, dim: int | None, rank: int, world: int) -> torch.Tensor:
    return full if dim is None else torch.chunk(full, world, dim=dim)[rank]


def _codec_rank(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    cases = [
        ((7, 40), [Shard(0)], 0),  # uneven: 4 and 3 rows, neither a whole number of blocks
        ((4, 16, 64), [Shard(1)], 1),
        ((6, 96), [Replicate()], None),
        ((8, 48), [Shard(1)], 1),
    ]
    out: dict = {"checked": 0}
    for si, spec in enumerate(SPECS):
        for ci, (shape, placements, dim) in enumerate(cases):
            full = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
            full.view(-1)[::11] *= 50  # outliers, so blocks have different scales
            x = distribute_tensor(full.float(), mesh, placements)
            if ci == 3:  # a transposed (non-contiguous) DTensor: Shard(1) becomes Shard(0)
                x = x.t()
            p = quantize(x, spec)
            y = dequantize(p)
            assert isinstance(y, DTensor), type(y)
            assert y.device_mesh == x.device_mesh and y.placements == x.placements
            assert y.shape == x.shape and y.stride() == x.stride(), (y.stride(), x.stride())
            assert y.dtype == torch.float32
            local = x.to_local()
            assert y.to_local().shape == local.shape
            assert y.to_local().stride() == local.stride()
            # Bytes are this rank's: payload + scales of the local elements only.
            assert p.numel == local.numel()
            assert p.nbytes == spec.nbytes(local.numel())
            assert p.original_nbytes == local.numel() * 4
            # fp64 reference, computed on this rank's part of the full tensor (the codec's
            # blocks follow the local tensor's memory order; the transposed case is
            # blocked along the original rows).
            ref_full = full.t() if ci == 3 else full
            sdim = None if dim is None else (1 - dim if ci == 3 else dim)
            ref = _shard(ref_full, sdim, rank, world)
            got = y.to_local().double()
            if ci == 3:  # blocked in memory order = rows of the untransposed shard
                ref, got = ref.t(), got.t()
            bound = _half_step_bound(ref.contiguous(), got, spec)
            err = (got.reshape(-1) - ref.contiguous().reshape(-1)).abs()
            assert torch.all(err <= bound), (si, ci, (err - bound).max().item())
            # The full tensor gathered through the rebuilt DTensor puts this rank's values
            # where the shard belongs (mesh, placements and global shape are right).
            gathered = y.full_tensor()
            assert gathered.shape == ref_full.shape
            assert torch.equal(_shard(gathered, sdim, rank, world), y.to_local())
            out["checked"] += 1

    # NaN propagates: only the block holding it comes back NaN, on the rank that holds it.
    spec = SPECS[0]
    full = torch.randn(6, 256, generator=gen)
    full[4, 3] = math.nan  # row 4 lives on rank 1 (rows 3..5)
    y = dequantize(quantize(distribute_tensor(full, mesh, [Shard(0)]), spec))
    loc = y.to_local()
    out["nan_local"] = int(torch.isnan(loc).sum())
    g = y.full_tensor()
    out["nan_at_source"] = bool(torch.isnan(g[4, 3]))
    out["nan_rows"] = sorted({int(r) for r in torch.nonzero(torch.isnan(g))[:, 0]})

    # A DTensor that requires grad is detached, like a plain tensor.
    w = distribute_tensor(torch.randn(4, 64, generator=gen), mesh, [Shard(0)])
    w.requires_grad_(True)
    yw = dequantize(quantize(w, spec))
    out["grad_free"] = not yw.requires_grad and isinstance(yw, DTensor)
    return out


def test_dtensor_round_trip_within_bound_on_two_ranks():
    results = run_ranks(_codec_rank, 2, timeout=120)
    for r in results:
        assert r["checked"] == len(SPECS) * 4
        assert r["nan_at_source"]
        assert r["nan_rows"] == [4]
        assert r["grad_free"]
    # The NaN's block (128 elements of row 4) is on rank 1 only.
    assert results[0]["nan_local"] == 0
    assert results[1]["nan_local"] == 128
