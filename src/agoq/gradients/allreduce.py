"""The precision-preserving int8 all-reduce (AGoQ's QuanGrad reduction).

quantize the local tensor once (block-wise int8) -> ``all_to_all_single`` of payload and
scales -> each rank dequantizes the W chunks it owns and sums them in fp32 -> requantize the
reduced chunk once -> ``all_gather_into_tensor`` -> dequantize. Every element is quantized
exactly twice whatever the world size W, so the error does not grow with W (a ring that
requantizes at every hop does). The reduced chunk is quantized by its owner only and then
gathered, so every rank ends with bitwise-identical values. A block holding NaN/Inf on any
rank is NaN on every rank. Each rank's dequantized chunk is divided by W *before* the fp32
sum (as DDP's default hook divides before its all-reduce), so gradients near the fp32
maximum stay finite. float64 is refused (the path is fp32 inside; it would silently lose
range and precision).

Wire: the padded tensor is viewed as ``(world, chunk)`` and quantized by the one codec op
(:func:`agoq.quant.ops.quantize_rows`) into a ``(world, row_bytes)`` uint8 wire whose row r
is chunk r's payload followed by its scales, so ONE ``all_to_all_single`` carries both; the
reduced chunk is one such row, and ONE all-gather returns ``(world, row_bytes)``. Parameter
segments are put on block boundaries with views and zero pads (one ``torch.cat``), and the
result is written back through views: no index tensors.

The collectives here are synchronous (issued and waited for in the calling thread). The DDP
hook (:mod:`agoq.gradients.ddp`) overlaps them with backward by running them on a comm
worker thread of its own, on a process group of its own.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..quant import QuantSpec
from ..quant.codec import dequantize_flat_torch, quantize_flat_torch
from ..quant.ops import dequantize_rows, quantize_rows, row_layout, split_wire

# Block 128 with bf16 scales, not the 256/fp32 first planned: on real gradients (2 ranks)
# block 256 gives 1.06% relative error, 128 gives 0.95%; bf16 scales (rounded up) cost no
# measurable error and keep the wire at 0.254x fp32 / 0.508x bf16 (fp32 scales: 0.516x bf16).
DEFAULT_SPEC = QuantSpec(bits=8, format="int", block=128, scale_dtype=torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """How a tensor of ``numel`` elements is split over ``world`` ranks."""

    numel: int
    world: int
    block: int

    @property
    def chunk(self) -> int:
        """Elements each rank reduces (a whole number of blocks)."""
        per = -(-self.numel // self.world)
        return -(-per // self.block) * self.block

    @property
    def padded(self) -> int:
        """Elements after zero padding to ``world * chunk``."""
        return self.chunk * self.world


def _check(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an agoq QuantSpec, got {type(spec).__name__}")
    if spec.format != "int" or spec.bits != 8:
        raise ValueError(f"the int8 all-reduce needs an 8-bit int QuantSpec, got {spec}")


def check_grad_dtype(dtype: torch.dtype, where: str) -> None:
    """Refuse what the fp32 int8 path would silently corrupt: non-floating tensors and
    float64 (1e-50 would come back 0, 1e300 NaN)."""
    if dtype == torch.float64:
        raise TypeError(
            f"{where}: float64 gradients are not supported (the int8 path computes in fp32, "
            "which would flush small values to 0 and overflow large ones); use float32, "
            "bfloat16 or float16, or a full-precision reduction for float64"
        )
    if not dtype.is_floating_point:
        raise TypeError(f"{where} needs a floating tensor, got {dtype}")


def _check_segments(segments: list[tuple[int, int]], numel: int) -> None:
    if not isinstance(segments, (list, tuple)):
        raise TypeError(
            f"segments must be a list of (offset, numel), got {type(segments).__name__}"
        )
    end = 0
    for seg in segments:
        if (
            not isinstance(seg, (list, tuple))
            or len(seg) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in seg)
        ):
            raise TypeError(
                f"segments: each entry must be an (offset, numel) int pair, got {seg!r}"
            )
        off, n = seg
        if off < end or n < 0 or off + n > numel:
            raise ValueError(
                f"segments: ({off}, {n}) overlaps the previous segment or lies outside the "
                f"tensor of {numel} elements (segments must be sorted and disjoint)"
            )
        end = off + n


def _reset_non_finite_blocks(err: torch.Tensor) -> None:
    """Zero the error-feedback residual of every block that was not finite.

    A non-finite block (an fp16 overflow that GradScaler will skip) must still be sent as
    NaN, but its residual would be NaN too and poison every later step: it restarts at 0.
    Finite blocks keep their residual. ``err`` is ``x - dequantize(quantize(x))``: a block
    holding NaN/Inf has a NaN scale, so its whole dequantized block, and thus its whole
    ``err`` block, is NaN, while a finite block's error is finite (|err| <= half a step).
    So zeroing the non-finite elements is zeroing the non-finite blocks, in one
    elementwise pass (a per-block ``isfinite().all()`` took 10x as long)."""
    torch.nan_to_num_(err, nan=0.0, posinf=0.0, neginf=0.0)


def wire_bytes(
    numel: int,
    world: int,
    spec: QuantSpec = DEFAULT_SPEC,
    segments: list[tuple[int, int]] | None = None,
) -> int:
    """Bytes one rank sends for the int8 all-reduce of ``numel`` elements (payload + scales).

    The all-to-all sends W-1 of the rank's W chunks; the all-gather sends the rank's reduced
    chunk to each of the W-1 others (counted once per destination, as for all_reduce's
    ring, which sends 2(W-1)/W of the tensor). With ``segments`` (as passed to
    :func:`int8_all_reduce`) each segment is first padded to whole blocks."""
    if segments is not None and len(segments) > 1:
        numel = sum(-(-n // spec.block) * spec.block for _, n in segments)
    lay = Layout(numel, world, spec.block)
    # One wire row per chunk: payload, scales and the scales' alignment padding, which is
    # what all_to_all_single and the all-gather carry.
    return 2 * (world - 1) * row_layout(spec, lay.chunk).row_bytes


def reference_all_reduce(
    tensors: list[torch.Tensor], spec: QuantSpec = DEFAULT_SPEC, *, average: bool = True
) -> torch.Tensor:
    """Single-process reference of the collective for the tensors of all ranks: quantize
    each, dequantize, [divide by the world size], sum in fp32 (rank order), quantize once,
    dequantize."""
    world = len(tensors)
    lay = Layout(tensors[0].numel(), world, spec.block)
    total = torch.zeros(lay.padded, dtype=torch.float32)
    for t in tensors:
        flat = torch.nn.functional.pad(t.reshape(-1).float(), (0, lay.padded - t.numel()))
        parts = []
        for r in range(world):  # quantized chunk by chunk, as each rank sends them
            part = flat[r * lay.chunk : (r + 1) * lay.chunk]
            p, s = quantize_flat_torch(part, spec)
            parts.append(dequantize_flat_torch(p, s, spec, lay.chunk, torch.float32))
        part = torch.cat(parts)
        total += part / world if average else part
    out = []
    for r in range(world):
        p, s = quantize_flat_torch(total[r * lay.chunk : (r + 1) * lay.chunk], spec)
        out.append(dequantize_flat_torch(p, s, spec, lay.chunk, torch.float32))
    return torch.cat(out)[: lay.numel].view(tensors[0].shape).to(tensors[0].dtype)


def _all_gather(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False
) -> dist.Work | None:
    # all_gather_into_tensor is deprecated in favour of all_gather_single in recent torch.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=async_op)


def gather_fields(
    fields: list[tuple[str, int]], group: dist.ProcessGroup | None, device: torch.device
) -> list[list[int]]:
    """All-gather the int values of ``fields`` over ``group``: one row per rank."""
    world = dist.get_world_size(group)
    mine = torch.tensor([v for _, v in fields], dtype=torch.int64, device=device)
    everyone = torch.empty(world * len(fields), dtype=torch.int64, device=device)
    _all_gather(everyone, mine, group)
    return everyone.view(world, len(fields)).cpu().tolist()


def check_fields(what: str, fields: list[tuple[str, int]], table: list[list[int]]) -> None:
    """Raise ValueError naming the fields whose values differ between the ranks' rows."""
    bad = []
    for j, (name, _) in enumerate(fields):
        col = [row[j] for row in table]
        if len(set(col)) > 1:
            bad.append(f"{name}: " + ", ".join(f"rank {r}={v}" for r, v in enumerate(col)))
    if bad:
        raise ValueError(
            f"agoq {what}: the ranks' settings differ, so their gradients cannot be reduced "
            "together (configure every rank the same): " + "; ".join(bad)
        )


def verify_same_on_all_ranks(
    what: str, fields: list[tuple[str, int]], group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """All-gather ``fields`` (name, int) over ``group``; raise ValueError on every rank naming
    the fields whose values differ between ranks."""
    check_fields(what, fields, gather_fields(fields, group, device))


@dataclass(frozen=True)
class Placement:
    """Where the segments of a flat tensor sit in the block-aligned buffer that is reduced.

    Plain ints, computed once per layout: ``segments`` ((offset, numel) in the tensor) each
    start on a block boundary at ``dst`` in the aligned buffer of ``aligned`` elements (each
    segment padded with zeros to whole blocks; elements outside every segment are not
    reduced and stay as they are). ``runs`` ((src, dst, numel)) merges neighbouring
    segments that need no padding between them, so a bucket whose parameters all hold whole
    blocks is one run: one view in, one copy out.
    """

    segments: tuple[tuple[int, int], ...]
    dst: tuple[int, ...]
    runs: tuple[tuple[int, int, int], ...]
    aligned: int


@functools.lru_cache(maxsize=256)
def placement(segments: tuple[tuple[int, int], ...], block: int) -> Placement:
    """The :class:`Placement` of ``segments`` (sorted, disjoint) for blocks of ``block``."""
    dst, runs, pos = [], [], 0
    for off, n in segments:
        dst.append(pos)
        if runs and runs[-1][0] + runs[-1][2] == off and runs[-1][1] + runs[-1][2] == pos:
            s0, d0, n0 = runs[-1]
            runs[-1] = (s0, d0, n0 + n)
        elif n:
            runs.append((off, pos, n))
        pos += -(-n // block) * block
    return Placement(tuple(segments), tuple(dst), tuple(runs), pos)


def _lay_out(
    parts: list[torch.Tensor], offsets: list[int], total: int, like: torch.Tensor
) -> torch.Tensor:
    """A flat tensor of ``total`` elements with ``parts[i]`` at ``offsets[i]`` and zeros
    elsewhere: one ``torch.cat`` of the parts and views of one zero tensor (the part
    itself when it already is the whole tensor)."""
    if len(parts) == 1 and offsets[0] == 0 and parts[0].numel() == total:
        return parts[0]
    gaps, pos = [], 0
    for t, off in zip(parts, offsets, strict=True):
        gaps.append(off - pos)
        pos = off + t.numel()
    gaps.append(total - pos)
    zeros = like.new_zeros(max(gaps))
    pieces: list[torch.Tensor] = []
    for gap, t in zip(gaps, [*parts, None], strict=True):
        if gap:
            pieces.append(zeros[:gap])
        if t is not None:
            pieces.append(t)
    return torch.cat(pieces)


class Scratch:
    """Work buffers kept between calls (grow-only, one caller at a time): the DDP comm
    worker reuses them bucket after bucket instead of allocating (and, on CPU, page-faulting
    in) fresh bucket-sized tensors."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of ``numel`` elements (contents undefined)."""
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_THREAD = threading.local()


def _thread_scratch(device: torch.device) -> Scratch | None:
    """The calling thread's work buffers for CPU tensors (None on accelerators, whose
    caching allocators already reuse memory). On CPU a fresh bucket-sized tensor is a
    fresh mmap that is page-faulted in on first touch: that cost more than the codec."""
    if device.type != "cpu":
        return None
    sc = getattr(_THREAD, "scratch", None)
    if sc is None:
        sc = _THREAD.scratch = Scratch()
    return sc


def padded_numel(place: Placement, world: int, block: int) -> int:
    """Elements of the aligned buffer once padded to ``world`` whole-block chunks."""
    return Layout(place.aligned, world, block).padded


#: Elements per pipeline piece of the collective (2 MB of fp32): the codec work of one
#: piece overlaps the all-to-all / all-gather of the others. Measured (2 gloo ranks, 1
#: Gbit/s): a 7M-element DDP bucket took 188 ms in 8 MB pieces, 130 ms in 2 MB pieces
#: (its bytes alone take 115 ms); 1 MB pieces were no faster.
PIECE_ELEMS = 1 << 19


def _pieces(padded: int, world: int, block: int) -> list[tuple[int, int]]:
    """(start, per-rank chunk) of each pipeline piece of the padded buffer: W whole-block
    chunks each. The block grid is the buffer's own, so the pieces change no value (blocks
    are quantized independently) and no byte on the wire (rows are linear in their size)."""
    cp_full = max(1, PIECE_ELEMS // (world * block)) * block
    out, start = [], 0
    while start < padded:
        cp = min(cp_full, (padded - start) // world)
        out.append((start, cp))
        start += world * cp
    return out


def reduce_flat(
    flat: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    spec: QuantSpec,
    place: Placement,
    average: bool = True,
    generator: torch.Generator | None = None,
    residual: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> None:
    """The int8 all-reduce of the segments of the contiguous 1-D ``flat``, in place.

    ``residual`` (fp32, contiguous, :func:`padded_numel` elements laid out like the aligned
    buffer: segment i at ``place.dst[i]``, zeros between) is error feedback: added before
    the first quantization, then overwritten with its error (0 in blocks that were not
    finite). Arguments are not validated here (the callers do).

    Pipelined in pieces (:func:`_pieces`): quantize every piece and issue its all-to-all
    (async), then per piece in order wait, reduce, requantize and issue its all-gather,
    then wait and write back. Every rank issues the same collectives in the same order."""
    world = dist.get_world_size(group)
    if world == 1:
        if residual is not None:
            residual.zero_()
        return
    B = spec.block
    padded = Layout(place.aligned, world, B).padded
    if padded == 0:  # nothing to reduce (every rank sees the same empty layout)
        return
    dev = flat.device
    sc = scratch if scratch is not None else Scratch()
    runs = place.runs
    # One run from element 0 (a bucket whose parameters all hold whole blocks): the input
    # rows are views of the tensor itself and the output is written straight into it.
    n = runs[0][2] if len(runs) == 1 and runs[0][:2] == (0, 0) else -1
    pieces = _pieces(padded, world, B)

    src: torch.Tensor | None = None  # the aligned, padded input (None: views of flat)
    if residual is not None:
        src = sc.get("x", padded, torch.float32, dev)
        if n >= 0:
            torch.add(flat[:n], residual[:n], out=src[:n])
            src[n:].zero_()  # the residual's padding is 0 (the error of padding is 0)
        else:
            lay_x = _lay_out(
                [flat[s : s + k] for s, _, k in runs], [d for _, d, _ in runs], padded, flat
            )
            torch.add(lay_x, residual, out=src)
    elif n < 0:
        src = _lay_out([flat[s : s + k] for s, _, k in runs], [d for _, d, _ in runs], padded, flat)

    def rows_in(start: int, cp: int) -> torch.Tensor:
        stop = start + world * cp
        if src is not None:
            return src[start:stop].view(world, cp)
        if stop <= n:
            return flat[start:stop].view(world, cp)
        # The piece holding the tensor's end: only it is copied, and zero-padded.
        tail = sc.get("tail", world * cp, flat.dtype, dev)
        k = n - start
        tail[:k].copy_(flat[start:n])
        tail[k:].zero_()
        return tail.view(world, cp)

    # 1. Quantize each piece (chunks are whole blocks: row r is rank r's chunk) and send.
    rb = [row_layout(spec, cp).row_bytes for _, cp in pieces]
    recv_all = sc.get("recv", world * sum(rb), torch.uint8, dev)
    wires, recvs, sends = [], [], []
    pos = 0
    finite = True
    for (start, cp), b in zip(pieces, rb, strict=True):
        x = rows_in(start, cp)
        wire = quantize_rows(x, spec, generator=generator)
        if residual is not None:
            sent = residual[start : start + world * cp].view(world, cp)
            w_payload, w_scales = split_wire(wire, spec, cp)
            dequantize_rows(w_payload, w_scales, spec, cp, out=sent)
            torch.sub(x, sent, out=sent)
            # A CPU check of the block scales is cheap; on an accelerator it would sync.
            finite = finite and dev.type == "cpu" and bool(torch.isfinite(w_scales).all())
        recv = recv_all[pos : pos + world * b].view(world, b)
        pos += world * b
        sends.append(dist.all_to_all_single(recv, wire, group=group, async_op=True))
        wires.append(wire)
        recvs.append(recv)
    if residual is not None and not finite:
        _reset_non_finite_blocks(residual)

    # 2. Per piece: the W received chunks -> divide -> fp32 sum -> quantize -> gather.
    gathers, mines = [], []
    cp_max = max(cp for _, cp in pieces)
    parts_buf = sc.get("parts", world * cp_max, torch.float32, dev)
    reduced_buf = sc.get("reduced", cp_max, torch.float32, dev)
    # Divide before the sum: W values near the fp32 maximum must not overflow. For a
    # power-of-two W, dividing the block scales instead is the same in exact arithmetic
    # and in fp32 (code x scale is exact, a division by 2^k too; only a scale in the
    # subnormal range, a block whose absmax is below ~1e-36, can round differently), and
    # it saves a pass over the dequantized parts.
    exact = average and world & (world - 1) == 0
    for (_, cp), recv, wire, work in zip(pieces, recvs, wires, sends, strict=True):
        work.wait()
        payload, scales = split_wire(recv, spec, cp)
        if exact:
            scales.div_(world)
        parts = parts_buf[: world * cp].view(world, cp)
        dequantize_rows(payload, scales, spec, cp, out=parts)
        if average and not exact:
            parts.div_(world)
        reduced = reduced_buf[:cp].view(1, cp)
        torch.sum(parts, dim=0, keepdim=True, out=reduced)  # fp32, fixed order
        mine = quantize_rows(reduced, spec, generator=generator)
        # The sent wire is no longer needed: gather into it.
        gathers.append(_all_gather(wire, mine, group, async_op=True))
        mines.append(mine)

    # 3. Dequantize the gathered pieces into the tensor.
    out_all = sc.get("x", padded, torch.float32, dev) if n < 0 else None
    for (start, cp), wire, work in zip(pieces, wires, gathers, strict=True):
        work.wait()
        payload, scales = split_wire(wire, spec, cp)
        stop = start + world * cp
        if out_all is not None:
            dequantize_rows(payload, scales, spec, cp, out=out_all[start:stop].view(world, cp))
        elif stop <= n and flat.dtype == torch.float32:
            dequantize_rows(payload, scales, spec, cp, out=flat[start:stop].view(world, cp))
        else:
            tmp = parts_buf[: world * cp].view(world, cp)
            dequantize_rows(payload, scales, spec, cp, out=tmp)
            k = min(stop, n) - start
            flat[start : start + k].copy_(tmp.view(-1)[:k])
    del mines
    if out_all is not None:
        for s, d, k in runs:  # elements outside the segments (bucket padding) unchanged
            flat[s : s + k].copy_(out_all[d : d + k])


def int8_all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    average: bool = True,
    spec: QuantSpec = DEFAULT_SPEC,
    generator: torch.Generator | None = None,
    residual: torch.Tensor | None = None,
    segments: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """All-reduce ``tensor`` in place over ``group`` in int8 and return it.

    ``average`` divides by the world size (like DDP's default hook: each rank's part is
    divided before the fp32 sum, so values near the fp32 maximum do not overflow).
    ``residual`` (fp32, contiguous, same numel, optional) turns on error feedback: it is
    added to the tensor before the first quantization and overwritten with that
    quantization's error (reset to 0 in blocks that were not finite). ``segments``
    ((offset, numel) per parameter, sorted, disjoint) puts each segment on its own blocks,
    so parameters with small gradients keep their precision. float64 raises TypeError. On
    CPU the calling thread keeps its work buffers (about 1.3x the largest tensor's bytes)
    for the next call.
    """
    _check(spec)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"int8_all_reduce needs a tensor, got {type(tensor).__name__}")
    check_grad_dtype(tensor.dtype, "int8_all_reduce")
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {type(average).__name__}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32:
            raise TypeError("residual must be a float32 tensor")
        if residual.numel() != tensor.numel() or residual.device != tensor.device:
            raise ValueError(
                f"residual has {residual.numel()} elements on {residual.device}, the tensor "
                f"{tensor.numel()} on {tensor.device}"
            )
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous (it is updated in place)")
    if segments is not None:
        _check_segments(segments, tensor.numel())
    if segments is None or len(segments) <= 1:
        segs: tuple[tuple[int, int], ...] = ((0, tensor.numel()),)
    else:
        segs = tuple((int(o), int(n)) for o, n in segments)
    place = placement(segs, spec.block)
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
    res = None
    if residual is not None:
        rflat = residual.view(-1)
        padded = padded_numel(place, dist.get_world_size(group), spec.block)
        res = _lay_out([rflat[o : o + n] for o, n in segs], list(place.dst), padded, rflat)
    reduce_flat(
        flat,
        group,
        spec=spec,
        place=place,
        average=average,
        generator=generator,
        residual=res,
        scratch=_thread_scratch(flat.device),
    )
    if res is not None and res.data_ptr() != residual.data_ptr():  # else updated in place
        rflat = residual.view(-1)
        for (o, n), d in zip(segs, place.dst, strict=True):
            rflat[o : o + n].copy_(res[d : d + n])
    if flat.data_ptr() != tensor.data_ptr() or not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def int8_all_reduce_functional(
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    average: bool = True,
    spec: QuantSpec = DEFAULT_SPEC,
) -> torch.Tensor:
    """The same collective with functional collectives, traceable by torch.compile
    (compiled DDP's per-parameter hook path): one all-to-all and one all-gather of wire
    rows. Returns a new tensor."""
    from .._compat import functional_collectives

    fcol = functional_collectives()
    _check(spec)
    check_grad_dtype(tensor.dtype, "int8_all_reduce_functional")
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    lay = Layout(tensor.numel(), world, spec.block)
    chunk = lay.chunk
    flat = torch.nn.functional.pad(tensor.reshape(-1), (0, lay.padded - lay.numel))
    wire = quantize_rows(flat.view(world, chunk), spec)
    recv = fcol.wait_tensor(fcol.all_to_all_single(wire, None, None, group))
    parts = dequantize_rows(*split_wire(recv, spec, chunk), spec, chunk, torch.float32)
    if average:
        parts = parts / world
    reduced = parts.sum(dim=0, keepdim=True)
    mine = quantize_rows(reduced, spec)
    gathered = fcol.wait_tensor(fcol.all_gather_tensor(mine, 0, group))
    out = dequantize_rows(*split_wire(gathered, spec, chunk), spec, chunk, torch.float32)
    return out.reshape(-1)[: lay.numel].view(tensor.shape).to(tensor.dtype)


def relative_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(a - ref) / RMS(ref), in float64."""
    d = (a.double() - ref.double()).pow(2).mean().sqrt().item()
    r = ref.double().pow(2).mean().sqrt().item()
    if r == 0:
        return 0.0 if d == 0 else math.inf
    return d / r
