"""The int8 gradient reduction for FSDP2 (``torch.distributed.fsdp.fully_shard``).

Two integration points, both public FSDP2 APIs (torch 2.13):

* :class:`Int8ReduceScatter`, installed with ``FSDPModule.set_custom_reduce_scatter`` (or
  :func:`install_int8_reduce_scatter` for a whole model), replaces FSDP's gradient
  reduce-scatter over the *shard* group: quantize the flat unsharded gradient once (int8,
  block-wise, fp32 scales; every shard, and with the module's layout every parameter inside
  a shard, starts a new block; the codec op's rows are the W shards, so payload and scales
  travel in ONE ``all_to_all_single`` of the ``(W, row_bytes)`` wire) -> dequantize
  the W received chunks, apply FSDP's reduce op's factor (AVG, SUM or PREMUL_SUM(factor)) to
  each *before* the fp32 sum in rank order (so values near the fp32 maximum do not
  overflow) -> write the shard in ``reduce_dtype``. Each element is
  quantized exactly once: a reduce-scatter has no all-gather stage, so nothing is
  requantized. A block holding NaN/Inf on any rank is NaN in the owner's shard (the codec
  poisons the whole block), so non-finite gradients are never hidden.
* :func:`int8_all_reduce_hook`, installed with ``FSDPModule.set_all_reduce_hook`` (or
  :func:`install_int8_all_reduce_hook`), is for "custom HSDP": 1-D FSDP over a shard group
  plus a *separate* replicate group that FSDP does not know about. FSDP runs the hook on the
  reduce-scattered shard (before its own post-division); the hook *is* the all-reduce across
  replicas, done with :func:`agoq.gradients.allreduce.int8_all_reduce` (two quantizations
  per element; with the reduce-scatter, three).

Covered:

* 1-D FSDP meshes with a shard group of >= 2 ranks (the reduce-scatter); fp32, bf16 and fp16
  ``reduce_dtype``; every op FSDP2 passes: AVG by default for fp32/bf16 (and when the divide
  factor equals the shard size), ``PREMUL_SUM(1/f)`` after ``set_gradient_divide_factor(f)``,
  SUM with ``set_force_sum_reduction_for_comms(True)`` or an fp16 ``reduce_dtype`` (FSDP
  then divides itself). PREMUL_SUM works on gloo too: the sum happens here, not in gloo.
* The shard-group reduce-scatter of native HSDP (2-D mesh): int8; its replicate all-reduce is
  not (below).
* Custom HSDP: 1-D FSDP (any shard size, including 1) + the hook over a replicate group.

Not covered:

* Shard groups of size 1: FSDP copies the gradient and never calls the custom reduce-scatter.
* The replicate all-reduce of native HSDP (a 2-D mesh passed to ``fully_shard``) and of
  ``replicate_with_fsdp.replicate``: a hard-coded ``dist.all_reduce`` in ``foreach_reduce``
  with no replacement API, so it stays full precision. ``set_all_reduce_hook`` there runs
  *after* it (:func:`install_int8_all_reduce_hook` refuses such modules).
* Modules with several parameter groups (per-parameter meshes via ``shard_placement_fn``):
  FSDP refuses custom comms and hooks for them.

Collectives are issued and waited for synchronously from the calling thread (FSDP2 calls
the comm on its own reduce-scatter stream; gloo runs ``Future`` callbacks on its worker
threads, where a collective that waits for another deadlocks). Parameter segments are laid
on block boundaries with views and zero pads (one ``torch.cat``), no index tensors, and the
hot path has no host syncs and no per-rank Python loop. At its first call
each comm and hook exchanges a fingerprint of its settings over its group (one small
all_gather) and raises on every rank, naming the fields, if they differ. float64 is refused.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .._compat import (
    fsdp_has_replicate_dim,
    fsdp_reduce_scatter_base,
    fsdp_shard_sizes,
    work_from_future,
)
from .._validate import expect_bool, expect_int
from ..quant import QuantSpec
from ..quant.ops import dequantize_rows, quantize_rows, split_wire
from .allreduce import (
    Placement,
    check_grad_dtype,
    int8_all_reduce,
    placement,
    verify_same_on_all_ranks,
)

__all__ = [
    "Int8ReduceScatter",
    "install_int8_all_reduce_hook",
    "install_int8_reduce_scatter",
    "int8_all_reduce_hook",
    "reduce_op_scale",
    "shard_segments",
]

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    # For type checkers: the real class is built at first use (see __getattr__).
    Int8ReduceScatter: type

_ReduceOpLike = dist.ReduceOp | dist.ReduceOp.RedOpType


# Bump when the comm's collective sequence or math changes (ranks must agree on it).
# 3: payload + scales in one all-to-all.
_PROTOCOL = 3
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


def _spec(block: int) -> QuantSpec:
    expect_int(block, "block")
    return QuantSpec(bits=8, format="int", block=block)


def _check_min_numel(min_numel: int) -> None:
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")


def _check_segments(segments: Sequence[int] | None) -> None:
    if segments is None:
        return
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise TypeError(f"segments must be a list of ints or None, got {type(segments).__name__}")
    for x in segments:
        expect_int(x, "segments[i] (elements per parameter)", low=0)


def _crc(values: Sequence[int] | None) -> int:
    return -1 if values is None else zlib.crc32(",".join(map(str, values)).encode())


def reduce_op_scale(op: _ReduceOpLike, world: int) -> float | torch.Tensor | None:
    """The factor to multiply the fp32 sum by for FSDP's reduce ``op`` (None: plain sum).

    SUM -> None, AVG -> 1/world, PREMUL_SUM(f) -> f (a float or a 0-d tensor). The premul
    factor is applied once to the sum rather than to every input: the same value in exact
    arithmetic, W times fewer multiplies. Any other op raises ValueError.
    """
    # FSDP passes either a bare RedOpType (SUM, AVG) or a ReduceOp object carrying a factor
    # (``ReduceOp.PREMUL_SUM(1 / factor)``); the object exposes the type as ``.op``.
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.SUM:
        return None
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world
    if kind == dist.ReduceOp.PREMUL_SUM:
        try:
            return op.factor  # type: ignore[union-attr]
        except (AttributeError, RuntimeError) as e:
            raise ValueError(
                "Int8ReduceScatter got ReduceOp.PREMUL_SUM without a factor; build it with "
                "ReduceOp.PREMUL_SUM(factor) or dist._make_nccl_premul_sum(factor)"
            ) from e
    raise ValueError(
        f"Int8ReduceScatter supports the gradient reductions FSDP2 uses (SUM, AVG, "
        f"PREMUL_SUM(factor)); got {op!r}"
    )


def _apply_scale(acc: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return acc
    if isinstance(scale, torch.Tensor):
        return acc.mul_(scale.to(device=acc.device, dtype=acc.dtype))
    return acc.mul_(scale) if scale != 1.0 else acc


def _completed_work(result: torch.Tensor) -> dist.Work:
    fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
    fut.set_result([result])
    return work_from_future(fut)


class _BlockLayout:
    """Where the elements of a flat FSDP gradient shard go so that blocks follow parameters.

    FSDP packs each parameter's shard back to back (``segments``: elements per parameter).
    Quantizing that buffer in plain blocks would let a block straddle two parameters, and a
    parameter with small gradients (a norm weight next to an output projection) would then
    be quantized with its neighbour's scale: 10-20% error on it. Each segment is therefore
    padded to whole blocks. ``get(n)`` returns the :class:`Placement` of a shard of ``n``
    elements (plain ints: views and zero pads, no index tensors).
    """

    def __init__(self, segments: Sequence[int] | None, block: int) -> None:
        self.segments = None if segments is None else [int(x) for x in segments]
        self.block = block
        self.mismatches = 0
        self._pairs: tuple[tuple[int, int], ...] | None = None
        if self.segments is not None:
            offs, pos = [], 0
            for x in self.segments:
                offs.append((pos, x))
                pos += x
            self._pairs = tuple(offs)

    def get(self, n: int) -> Placement:
        """The placement of an ``n``-element shard: per parameter when the layout is known
        and adds up to ``n``, else plain blocks from the start of the shard."""
        segs = self.segments
        if segs is None or sum(segs) != n:
            # Unknown layout, or not every parameter had a gradient this time (FSDP only
            # packs those that did): plain blocks from the start of the shard.
            self.mismatches += int(segs is not None)
            return placement(((0, n),), self.block)
        assert self._pairs is not None
        return placement(self._pairs, self.block)


def _lay_out_rows(rows: torch.Tensor, place: Placement) -> torch.Tensor:
    """``rows`` (W, n) with each run of ``place`` at its aligned column and zeros between
    and after: (W, place.aligned); ``rows`` itself when nothing moves."""
    world, n = rows.shape
    runs = place.runs
    if len(runs) == 1 and runs[0] == (0, 0, n) and place.aligned == n:
        return rows
    gaps, pos = [], 0
    for _, d, k in runs:
        gaps.append(d - pos)
        pos = d + k
    gaps.append(place.aligned - pos)
    zeros = rows.new_zeros(world, max(gaps))
    pieces = []
    for gap, run in zip(gaps, [*runs, None], strict=True):
        if gap:
            pieces.append(zeros[:, :gap])
        if run is not None:
            pieces.append(rows[:, run[0] : run[0] + run[2]])
    return torch.cat(pieces, dim=1)


def shard_segments(module: FSDPModule) -> list[int] | None:
    """Elements per FSDP-managed parameter in ``module``'s gradient shard, in the order FSDP
    packs them for the reduce-scatter (None when FSDP state has no single parameter group).

    Reads FSDP2's private parameter-group state (``agoq._compat.fsdp_shard_sizes``); the
    comm re-checks the total at every call and falls back to plain blocks on a mismatch.
    """
    return fsdp_shard_sizes(module)


class _Int8ReduceScatterImpl:
    """FSDP2 gradient reduce-scatter with one int8 quantization per element.

    ``block``: elements per fp32 scale. ``min_numel``: reduce-scatters whose input has fewer
    elements skip quantization (same all-to-all + fp32 sum, full-precision wire).
    ``segments``: elements per parameter in a shard (:func:`shard_segments`); with it each
    parameter starts a new block, so no scale is shared by two parameters. Without it (or
    when a call's shard size does not match), blocks start at each shard's start.
    ``calls`` / ``full_precision_calls`` count the quantized and unquantized invocations.
    """

    def __init__(
        self, *, block: int = 256, min_numel: int = 0, segments: Sequence[int] | None = None
    ) -> None:
        self.spec = _spec(block)
        _check_min_numel(min_numel)
        _check_segments(segments)
        self.min_numel = min_numel
        self.layout = _BlockLayout(segments, block)
        self.calls = 0
        self.full_precision_calls = 0
        self._verified = False

    def allocate(
        self,
        size: Sequence[int | torch.SymInt],
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """A plain buffer: FSDP allocates the input and output in ``reduce_dtype`` here."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: _ReduceOpLike,
        async_op: bool = False,
    ) -> dist.Work | None:
        """Reduce ``input_tensor`` (world * shard elements) into this rank's ``output_tensor``.

        Runs to completion before returning; with ``async_op=True`` (FSDP2 never passes it)
        a completed Work is returned for callers that wait on it.
        """
        if not isinstance(input_tensor, torch.Tensor) or not isinstance(
            output_tensor, torch.Tensor
        ):
            raise TypeError("Int8ReduceScatter needs tensors for output_tensor and input_tensor")
        check_grad_dtype(input_tensor.dtype, "Int8ReduceScatter (input)")
        check_grad_dtype(output_tensor.dtype, "Int8ReduceScatter (output)")
        world = dist.get_world_size(group)
        scale = reduce_op_scale(op, world)  # validate the op before any collective
        n = output_tensor.numel()
        if input_tensor.numel() != world * n:
            raise ValueError(
                f"Int8ReduceScatter: input has {input_tensor.numel()} elements, expected "
                f"world ({world}) x output ({n})"
            )
        if not self._verified:
            verify_same_on_all_ranks(
                "Int8ReduceScatter",
                [
                    ("agoq comm protocol", _PROTOCOL),
                    ("block", self.spec.block),
                    ("min_numel", self.min_numel),
                    ("segments (parameter layout)", _crc(self.layout.segments)),
                    ("shard numel", n),
                    ("input dtype", _DTYPE_CODES.get(input_tensor.dtype, 0)),
                    ("output dtype", _DTYPE_CODES.get(output_tensor.dtype, 0)),
                ],
                group,
                input_tensor.device,
            )
            self._verified = True
        rows = input_tensor.reshape(world, n)  # row r is the shard rank r owns
        if input_tensor.numel() < self.min_numel:
            acc = self._full_precision(rows, group, scale)
        else:
            acc = self._int8(rows, group, scale)
        output_tensor.copy_(acc.view(output_tensor.shape))
        return _completed_work(output_tensor) if async_op else None

    def _int8(
        self, rows: torch.Tensor, group: dist.ProcessGroup, scale: float | torch.Tensor | None
    ) -> torch.Tensor:
        self.calls += 1
        world, n = rows.shape
        spec = self.spec
        # Pad each shard to whole blocks so no block straddles two ranks' shards (each
        # shard is one row of the codec op: its own blocks, payload and scales, so row r
        # of the wire is what rank r owns). Within a shard, each parameter is padded too.
        place = self.layout.get(n)
        padded = place.aligned
        wire = quantize_rows(_lay_out_rows(rows, place), spec)
        recv = torch.empty_like(wire)
        dist.all_to_all_single(recv, wire, group=group)
        del wire
        parts = dequantize_rows(*split_wire(recv, spec, padded), spec, padded, torch.float32)
        del recv
        # Scale each rank's part before the sum (W values near the fp32 maximum must not
        # overflow), then sum in fp32 in a fixed order: every rank computes its own shard.
        acc = _apply_scale(parts, scale).sum(dim=0)
        runs = place.runs
        if len(runs) <= 1 and (not runs or runs[0][:2] == (0, 0)):
            return acc[:n]
        return torch.cat([acc[d : d + k] for _, d, k in runs])

    def _full_precision(
        self, rows: torch.Tensor, group: dist.ProcessGroup, scale: float | torch.Tensor | None
    ) -> torch.Tensor:
        self.full_precision_calls += 1
        # All-to-all + local fp32 sum rather than dist.reduce_scatter_tensor: same order and
        # accumulation precision as the int8 path, and PREMUL_SUM works on gloo too.
        recv = torch.empty_like(rows)
        dist.all_to_all_single(recv, rows.contiguous(), group=group)
        return _apply_scale(recv.to(torch.float32, copy=True), scale).sum(dim=0)


@functools.cache
def _int8_reduce_scatter_class() -> type:
    """``Int8ReduceScatter``: the implementation above on FSDP2's private ``ReduceScatter``
    interface, built at first use so that importing agoq touches no private FSDP module."""
    base = fsdp_reduce_scatter_base()
    return type(
        "Int8ReduceScatter",
        (_Int8ReduceScatterImpl, base),
        {
            "__module__": __name__,
            "__qualname__": "Int8ReduceScatter",
            "__doc__": _Int8ReduceScatterImpl.__doc__,
        },
    )


def __getattr__(name: str) -> Any:
    # PEP 562: ``Int8ReduceScatter`` resolves its private FSDP base class on first access.
    if name == "Int8ReduceScatter":
        cls = _int8_reduce_scatter_class()
        globals()["Int8ReduceScatter"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        raise ValueError(
            f"no FSDPModule in {type(model).__name__}: apply "
            "torch.distributed.fsdp.fully_shard to the model (or its blocks) first"
        )
    return mods


def install_int8_reduce_scatter(model: nn.Module, *, block: int = 256, min_numel: int = 0) -> int:
    """Make every FSDP2 module in ``model`` reduce-scatter gradients in int8.

    Calls ``set_custom_reduce_scatter`` on each ``FSDPModule`` in ``model.modules()`` (the
    setter is not recursive) with an :class:`Int8ReduceScatter` that knows the module's
    parameter layout (:func:`shard_segments`); returns how many modules.
    """
    _spec(block)
    _check_min_numel(min_numel)
    mods = _fsdp_modules(model)
    for m in mods:
        comm = _int8_reduce_scatter_class()(
            block=block, min_numel=min_numel, segments=shard_segments(m)
        )
        m.set_custom_reduce_scatter(comm)
    return len(mods)


def int8_all_reduce_hook(
    group: dist.ProcessGroup,
    *,
    average: bool = True,
    block: int = 256,
    min_numel: int = 0,
    segments: Sequence[int] | None = None,
) -> Callable[[torch.Tensor], None]:
    """A ``FSDPModule.set_all_reduce_hook`` hook that int8-all-reduces the shard over ``group``.

    For custom HSDP: 1-D FSDP over a shard group, ``group`` the replicate group. FSDP runs
    the hook after the reduce-scatter and before its own post-division, so the defaults
    compose: FSDP averages over the shard group, ``average=True`` over ``group``, giving the
    global mean. With ``set_gradient_divide_factor(f)`` FSDP divides by ``f`` alone (the
    global factor, e.g. 1.0 in torchtitan), so pass ``average=False`` (sum over replicas).
    Shards with fewer than ``min_numel`` elements are all-reduced in fp32 instead.
    ``segments`` (:func:`shard_segments` of the module) starts a block at each parameter.
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"int8_all_reduce_hook: group must be a ProcessGroup, got {type(group).__name__}"
        )
    expect_bool(average, "int8_all_reduce_hook: average")
    spec = _spec(block)
    _check_min_numel(min_numel)
    _check_segments(segments)
    world = dist.get_world_size(group)
    layout = _BlockLayout(segments, block)
    verified = False

    def hook(reduce_output: torch.Tensor) -> None:
        nonlocal verified
        n = reduce_output.numel()
        check_grad_dtype(reduce_output.dtype, "int8_all_reduce_hook")
        if not verified:
            verify_same_on_all_ranks(
                "int8_all_reduce_hook",
                [
                    ("agoq comm protocol", _PROTOCOL),
                    ("block", block),
                    ("min_numel", min_numel),
                    ("average", int(average)),
                    ("segments (parameter layout)", _crc(layout.segments)),
                    ("shard numel", n),
                    ("dtype", _DTYPE_CODES.get(reduce_output.dtype, 0)),
                ],
                group,
                reduce_output.device,
            )
            verified = True
        if n >= min_numel:
            # int8_all_reduce puts each parameter's segment on its own blocks (views and
            # zero pads); a plain shard is one segment.
            place = layout.get(n)
            int8_all_reduce(
                reduce_output, group, average=average, spec=spec, segments=list(place.segments)
            )
            return
        acc = reduce_output.to(torch.float32)
        if average:  # before the sum, as DDP's default: no overflow near the fp32 maximum
            acc /= world
        dist.all_reduce(acc, group=group)
        reduce_output.copy_(acc)

    return hook


def install_int8_all_reduce_hook(
    model: nn.Module,
    group: dist.ProcessGroup,
    *,
    average: bool = True,
    block: int = 256,
    min_numel: int = 0,
) -> int:
    """``set_all_reduce_hook(int8_all_reduce_hook(group, ...))`` on every FSDP2 module in
    ``model``; returns how many. Raises ValueError for modules with a replicate mesh dim
    (native HSDP, ``replicate_with_fsdp``): FSDP's own all-reduce runs before the hook."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"install_int8_all_reduce_hook: group must be a ProcessGroup, got {type(group).__name__}"
        )
    expect_bool(average, "install_int8_all_reduce_hook: average")
    _spec(block)
    _check_min_numel(min_numel)
    mods = _fsdp_modules(model)
    for m in mods:
        # Private FSDP2 state, read only to refuse a double reduction: with a replicate mesh
        # dim (native HSDP, replicate_with_fsdp) FSDP all-reduces before running the hook.
        if fsdp_has_replicate_dim(m):
            raise ValueError(
                "install_int8_all_reduce_hook is for 1-D FSDP plus a separate replicate group; "
                "this module has a replicate mesh dim (native HSDP or replicate_with_fsdp), "
                "whose full-precision all-reduce cannot be replaced"
            )
    for m in mods:
        hook = int8_all_reduce_hook(
            group, average=average, block=block, min_numel=min_numel, segments=shard_segments(m)
        )
        m.set_all_reduce_hook(hook)
    return len(mods)
