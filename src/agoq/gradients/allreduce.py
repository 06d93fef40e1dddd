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

All collectives are issued, and waited for, from the calling thread: under gloo, collectives
launched from ``Future.then`` callbacks run on worker threads and can deadlock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..quant import QuantSpec
from ..quant.codec import dequantize_flat_torch, quantize_flat_torch

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


def _reset_non_finite_blocks(err: torch.Tensor, block: int) -> None:
    """Zero the error-feedback residual of every block that was not finite.

    A non-finite block (an fp16 overflow that GradScaler will skip) must still be sent as
    NaN, but its residual would be NaN too and poison every later step: it restarts at 0.
    Finite blocks keep their residual."""
    rows = err.view(-1, block)
    bad = ~torch.isfinite(rows).all(dim=1)
    rows.masked_fill_(bad.unsqueeze(1), 0.0)


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
    scale_size = torch.empty((), dtype=spec.scale_dtype).element_size()
    per_chunk = lay.chunk + (lay.chunk // spec.block) * scale_size
    return 2 * (world - 1) * per_chunk


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


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # all_gather_into_tensor is deprecated in favour of all_gather_single in recent torch.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def verify_same_on_all_ranks(
    what: str, fields: list[tuple[str, int]], group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """All-gather ``fields`` (name, int) over ``group``; raise ValueError on every rank naming
    the fields whose values differ between ranks."""
    world = dist.get_world_size(group)
    mine = torch.tensor([v for _, v in fields], dtype=torch.int64, device=device)
    everyone = torch.empty(world * len(fields), dtype=torch.int64, device=device)
    _all_gather(everyone, mine, group)
    table = everyone.view(world, len(fields)).cpu()
    bad = []
    for j, (name, _) in enumerate(fields):
        col = table[:, j].tolist()
        if len(set(col)) > 1:
            bad.append(f"{name}: " + ", ".join(f"rank {r}={v}" for r, v in enumerate(col)))
    if bad:
        raise ValueError(
            f"agoq {what}: the ranks' settings differ, so their gradients cannot be reduced "
            "together (configure every rank the same): " + "; ".join(bad)
        )


_ALIGN_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _aligned_index(
    segments: tuple[tuple[int, int], ...], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(source positions, aligned positions, aligned size): every segment starts on a block
    boundary, so a small-gradient parameter never shares a block scale with a large one."""
    key = (segments, block, device)
    hit = _ALIGN_CACHE.get(key)
    if hit is None:
        src, dst, pos = [], [], 0
        for off, n in segments:
            src.append(torch.arange(off, off + n))
            dst.append(torch.arange(pos, pos + n))
            pos += -(-n // block) * block
        hit = (torch.cat(src).to(device), torch.cat(dst).to(device), pos)
        if len(_ALIGN_CACHE) >= 256:  # buckets are few; bound it anyway
            _ALIGN_CACHE.pop(next(iter(_ALIGN_CACHE)))
        _ALIGN_CACHE[key] = hit
    return hit


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
    ``residual`` (fp32, same numel, optional) turns on error feedback: it is added to the
    tensor before the first quantization and overwritten with that quantization's error
    (reset to 0 in blocks that were not finite). ``segments`` ((offset, numel) per
    parameter, sorted, disjoint) puts each segment on its own blocks, so parameters with
    small gradients keep their precision. float64 raises TypeError.
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
    if segments is not None:
        _check_segments(segments, tensor.numel())
    world = dist.get_world_size(group)
    if world == 1:
        if residual is not None:
            residual.zero_()
        return tensor
    flat = tensor.reshape(-1).to(torch.float32)
    if residual is not None:
        flat = flat + residual.reshape(-1)
    src = dst = None
    if segments is not None and len(segments) > 1:
        src, dst, aligned = _aligned_index(tuple(segments), spec.block, flat.device)
        lay = Layout(aligned, world, spec.block)
        spread = flat.new_zeros(lay.padded)
        spread[dst] = flat[src]
        flat_in, flat = flat, spread
    else:
        lay = Layout(tensor.numel(), world, spec.block)
        flat = torch.nn.functional.pad(flat, (0, lay.padded - lay.numel))
    # Chunks are whole blocks: rank r's slice of payload and scales is exactly its chunk.
    payload, scales = quantize_flat_torch(flat, spec, generator)
    if residual is not None:
        sent = dequantize_flat_torch(payload, scales, spec, lay.padded, torch.float32)
        err = flat - sent
        _reset_non_finite_blocks(err, spec.block)
        if dst is not None:
            residual.reshape(-1)[src] = err[dst]
        else:
            residual.reshape(-1).copy_(err[: tensor.numel()])

    recv_payload = torch.empty_like(payload)
    recv_scales = torch.empty_like(scales)
    dist.all_to_all_single(recv_payload, payload, group=group)
    dist.all_to_all_single(recv_scales, scales, group=group)

    parts = dequantize_flat_torch(recv_payload, recv_scales, spec, lay.padded, torch.float32)
    if average:  # before the sum: W values near the fp32 maximum must not overflow
        parts /= world
    reduced = parts.view(world, lay.chunk).sum(dim=0)  # fp32, fixed rank order
    my_payload, my_scales = quantize_flat_torch(reduced, spec, generator)

    all_payload = torch.empty_like(payload)
    all_scales = torch.empty_like(scales)
    _all_gather(all_payload, my_payload, group)
    _all_gather(all_scales, my_scales, group)
    out = dequantize_flat_torch(all_payload, all_scales, spec, lay.padded, torch.float32)
    if dst is not None:
        flat_in[src] = out[dst]  # elements outside the segments (bucket padding) unchanged
        tensor.copy_(flat_in.view(tensor.shape))
    else:
        tensor.copy_(out[: tensor.numel()].view(tensor.shape))
    return tensor


def int8_all_reduce_functional(
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    average: bool = True,
    spec: QuantSpec = DEFAULT_SPEC,
) -> torch.Tensor:
    """The same collective with functional collectives, traceable by torch.compile
    (compiled DDP's per-parameter hook path). Returns a new tensor."""
    import torch.distributed._functional_collectives as fcol

    _check(spec)
    check_grad_dtype(tensor.dtype, "int8_all_reduce_functional")
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    lay = Layout(tensor.numel(), world, spec.block)
    flat = torch.nn.functional.pad(
        tensor.reshape(-1).to(torch.float32), (0, lay.padded - lay.numel)
    )
    payload, scales = quantize_flat_torch(flat, spec)
    recv_payload = fcol.wait_tensor(fcol.all_to_all_single(payload, None, None, group))
    recv_scales = fcol.wait_tensor(fcol.all_to_all_single(scales, None, None, group))
    parts = dequantize_flat_torch(recv_payload, recv_scales, spec, lay.padded, torch.float32)
    if average:
        parts = parts / world
    reduced = parts.view(world, lay.chunk).sum(dim=0)
    my_payload, my_scales = quantize_flat_torch(reduced, spec)
    all_payload = fcol.wait_tensor(fcol.all_gather_tensor(my_payload, 0, group))
    all_scales = fcol.wait_tensor(fcol.all_gather_tensor(my_scales, 0, group))
    out = dequantize_flat_torch(all_payload, all_scales, spec, lay.numel, torch.float32)
    return out.view(tensor.shape).to(tensor.dtype)


def relative_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(a - ref) / RMS(ref), in float64."""
    d = (a.double() - ref.double()).pow(2).mean().sqrt().item()
    r = ref.double().pow(2).mean().sqrt().item()
    if r == 0:
        return 0.0 if d == 0 else math.inf
    return d / r
