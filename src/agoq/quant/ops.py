"""The one codec op: ``torch.ops.agoq.quantize_blockwise`` / ``dequantize_blockwise``.

Activations, the int8 collectives, the FSDP2 reduce-scatter and ``Int8GradStore`` all call
this pair (through :func:`quantize_rows` / :func:`dequantize_rows`, or the ``Packed`` API of
:mod:`agoq.quant.codec`). They are ``torch.library`` custom ops with fake kernels, so eager
code, ``torch.compile`` graphs and collectives run the same kernel:

* CUDA: the fused Triton kernels (:mod:`agoq.quant.triton_kernels`), when Triton is there;
* CPU: a fused, vectorised C kernel (:mod:`agoq.quant.cpu_kernels`), built once per machine;
* anything else, or when neither can run: the pure-torch reference.

Every path gives the reference's bits under nearest rounding (the CUDA kernel also under
stochastic rounding given the same noise), so which one ran never changes a result.

Wire layout: the op quantizes a 2-D ``(rows, row_elems)`` tensor, each row as its own flat
tensor (its tail zero-padded to a whole block), into one uint8 tensor ``(rows, row_bytes)``.
A row holds the row's payload bytes (the codec layout of :mod:`agoq.quant.codec`), then its
scales' bytes, then padding to the scale's alignment. A run of rows is therefore contiguous
payload + scales, so one collective carries both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import codec
from .spec import QuantSpec

_FORMATS = ("int", "fp4_e2m1", "fp8_e4m3")


@dataclass(frozen=True)
class RowLayout:
    """Where a row's payload and scales sit in a wire row (all in bytes but ``nblocks``)."""

    nblocks: int
    payload_bytes: int
    scale_offset: int
    row_bytes: int


def row_layout(spec: QuantSpec, row_elems: int) -> RowLayout:
    """The wire geometry of rows of ``row_elems`` elements in ``spec``."""
    return _layout(spec.bits, spec.block, _scale_size(spec.scale_dtype), row_elems)


def _scale_size(scale_dtype: torch.dtype) -> int:
    return 2 if scale_dtype == torch.bfloat16 else 4


def _layout(bits: int, block: int, ssize: int, row_elems: int) -> RowLayout:
    if type(row_elems) is int:  # symbolic sizes (under compile) are not hashable
        return _layout_cached(bits, block, ssize, row_elems)
    return _compute_layout(bits, block, ssize, row_elems)


def _compute_layout(bits: int, block: int, ssize: int, row_elems: int) -> RowLayout:
    nb = -(-row_elems // block)
    pb = nb * block * bits // 8
    so = -(-pb // ssize) * ssize
    return RowLayout(nb, pb, so, so + nb * ssize)


_layout_cached = functools.lru_cache(maxsize=4096)(_compute_layout)


def _spec(bits: int, fmt: str, block: int, bf16_scales: bool, stochastic: bool) -> QuantSpec:
    return QuantSpec(
        bits=bits,
        format=fmt,
        block=block,
        rounding="stochastic" if stochastic else "nearest",
        scale_dtype=torch.bfloat16 if bf16_scales else torch.float32,
    )


# ------------------------------------------------------------------ reference kernels


def _reference_quantize(
    x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None
) -> torch.Tensor:
    """The torch reference over rows, loop-free (the fallback of every device)."""
    rows, n = x.shape
    lay = row_layout(spec, n)
    B = spec.block
    xb = torch.nn.functional.pad(x.to(torch.float32), (0, lay.nblocks * B - n))
    xb = xb.reshape(rows * lay.nblocks, B)
    s = codec.block_scales(xb, spec)
    nz = None if noise is None else noise.reshape(rows * lay.nblocks, B)
    codes = codec.encode_block_values(xb, s, spec, nz)
    payload = codec.pack_codes(codes, spec.bits).reshape(rows, lay.payload_bytes)
    sbytes = s.to(spec.scale_dtype).view(torch.uint8).reshape(rows, -1)
    wire = torch.zeros(rows, lay.row_bytes, dtype=torch.uint8, device=x.device)
    wire[:, : lay.payload_bytes] = payload
    wire[:, lay.scale_offset :] = sbytes
    return wire


def _reference_dequantize(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, n: int, dtype: torch.dtype
) -> torch.Tensor:
    rows = payload.shape[0]
    lay = row_layout(spec, n)
    flat = codec._dequantize_rows(
        payload.contiguous().reshape(-1), scales.contiguous().reshape(-1), spec, dtype
    )
    return flat.view(rows, lay.nblocks * spec.block)[:, :n].contiguous()


# ------------------------------------------------------------------------- the ops


@torch.library.custom_op("agoq::quantize_blockwise", mutates_args=())
def quantize_blockwise(
    x: torch.Tensor,
    bits: int,
    fmt: str,
    block: int,
    bf16_scales: bool,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize each row of ``x`` (rows, row_elems) into one uint8 wire (rows, row_bytes).

    ``noise`` (fp32 uniform [0, 1), shape (rows, nblocks * block)) selects stochastic
    rounding; None is round-to-nearest-even."""
    spec = _spec(bits, fmt, block, bf16_scales, noise is not None)
    return _quantize_impl(x, spec, noise)


def _quantize_impl(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None) -> torch.Tensor:
    """The op's kernel choice (also called directly by eager callers, see _eager)."""
    # The kernels index raw memory: a wrong shape or dtype must be an error, not a read
    # past the end (the op is public: torch.ops.agoq.quantize_blockwise).
    codec.check_quantizable(x)
    if x.dim() != 2:
        raise ValueError(
            f"agoq quantize_blockwise: x must be 2-D (rows, row_elems), got {x.dim()}-D"
        )
    if noise is not None:
        want = (x.shape[0], row_layout(spec, x.shape[1]).nblocks * spec.block)
        if noise.dtype != torch.float32 or tuple(noise.shape) != want or noise.device != x.device:
            raise ValueError(
                f"agoq quantize_blockwise: noise must be float32 of shape {want} on {x.device}, "
                f"got {noise.dtype} {tuple(noise.shape)} on {noise.device}"
            )
    x = x.contiguous()
    if noise is not None:
        noise = noise.contiguous()
    if x.device.type == "cpu":
        if cpu_kernels.supports(spec, x.dtype):
            return cpu_kernels.quantize(x, spec, noise)
    elif x.device.type == "cuda":
        from . import triton_kernels

        if triton_kernels.available(x.device):
            return triton_kernels.quantize_rows(x, spec, noise)
    return _reference_quantize(x, spec, noise)


@quantize_blockwise.register_fake
def _(x, bits, fmt, block, bf16_scales, noise=None):
    lay = _layout(bits, block, 2 if bf16_scales else 4, x.shape[1])
    return x.new_empty((x.shape[0], lay.row_bytes), dtype=torch.uint8)


def _check_parts(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, n: int, out: torch.Tensor
) -> None:
    """Shapes, dtypes and devices the dequantize kernels rely on (they index raw memory)."""
    rows = payload.shape[0] if payload.dim() == 2 else -1
    lay = row_layout(spec, n)
    problems = []
    if payload.dtype != torch.uint8 or tuple(payload.shape) != (rows, lay.payload_bytes):
        problems.append(
            f"payload must be uint8 (rows, {lay.payload_bytes}), got {payload.dtype} "
            f"{tuple(payload.shape)}"
        )
    if scales.dtype != spec.scale_dtype or tuple(scales.shape) != (rows, lay.nblocks):
        problems.append(
            f"scales must be {spec.scale_dtype} ({rows}, {lay.nblocks}), got {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    if tuple(out.shape) != (rows, n) or out.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ):
        problems.append(f"output must be a float ({rows}, {n}) tensor")
    if not (payload.device == scales.device == out.device):
        problems.append(
            f"payload, scales and output are on {payload.device}, {scales.device}, {out.device}"
        )
    if problems:
        raise ValueError(f"agoq dequantize_blockwise ({spec}): " + "; ".join(problems))


def _dequantize_into(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, n: int, out: torch.Tensor
) -> None:
    _check_parts(payload, scales, spec, n, out)
    if payload.device.type == "cpu":
        if cpu_kernels.supports(spec, out.dtype):
            cpu_kernels.dequantize(payload, scales, spec, n, out)
            return
    elif payload.device.type == "cuda":
        from . import triton_kernels

        if triton_kernels.available(payload.device):
            triton_kernels.dequantize_rows(payload, scales, spec, n, out)
            return
    out.copy_(_reference_dequantize(payload, scales, spec, n, out.dtype))


@torch.library.custom_op("agoq::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(
    payload: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    fmt: str,
    block: int,
    row_elems: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows (rows, row_elems) of ``dtype`` from payload (rows, payload_bytes) and scales
    (rows, nblocks); both may be row-strided views of a wire."""
    spec = _spec(bits, fmt, block, scales.dtype == torch.bfloat16, False)
    return _dequantize_new(payload, scales, spec, row_elems, dtype)


def _dequantize_new(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, n: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.empty((payload.shape[0], n), dtype=dtype, device=payload.device)
    _dequantize_into(payload, scales, spec, n, out)
    return out


@dequantize_blockwise.register_fake
def _(payload, scales, bits, fmt, block, row_elems, dtype):
    return payload.new_empty((payload.shape[0], row_elems), dtype=dtype)


@torch.library.custom_op("agoq::dequantize_blockwise_into", mutates_args=("out",))
def dequantize_blockwise_into(
    payload: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    fmt: str,
    block: int,
    out: torch.Tensor,
) -> None:
    """:func:`dequantize_blockwise` written into ``out`` (contiguous (rows, row_elems)): no
    allocation, e.g. straight into a gradient buffer."""
    spec = _spec(bits, fmt, block, scales.dtype == torch.bfloat16, False)
    _dequantize_into(payload, scales, spec, out.shape[1], out)


@dequantize_blockwise_into.register_fake
def _(payload, scales, bits, fmt, block, out):
    return None


# ---------------------------------------------------------------------- Python API


def _eager(t: torch.Tensor) -> bool:
    """True for a plain tensor outside tracing: the op's kernel is then called directly.

    Python custom-op dispatch costs ~80 us a call, which many small activations would pay;
    under torch.compile, for fake/functional tensors or tensor subclasses (DTensor) the
    registered op runs, so graphs hold it and subclasses dispatch as usual."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _check_rows(x: torch.Tensor, spec: QuantSpec) -> None:
    codec.check_quantizable(x)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an agoq QuantSpec, got {type(spec).__name__}")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D (rows, row_elems) tensor, got {x.dim()}-D")


def make_noise(
    shape: tuple[int, int], spec: QuantSpec, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """The uniform [0, 1) draws of stochastic rounding for rows of ``shape`` (padded to blocks)."""
    nb = -(-shape[1] // spec.block)
    return torch.rand((shape[0], nb * spec.block), generator=generator, device=device)


def quantize_rows(
    x: torch.Tensor, spec: QuantSpec, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Quantize every row of ``x`` (rows, row_elems) into one wire (rows, row_bytes).

    ``generator`` seeds stochastic rounding (ignored for nearest rounding)."""
    _check_rows(x, spec)
    noise = None
    if spec.rounding == "stochastic":
        noise = make_noise(tuple(x.shape), spec, generator, x.device)
    if _eager(x):
        return _quantize_impl(x, spec, noise)
    return torch.ops.agoq.quantize_blockwise(
        x, spec.bits, spec.format, spec.block, spec.scale_dtype == torch.bfloat16, noise
    )


def split_wire(
    wire: torch.Tensor, spec: QuantSpec, row_elems: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload (rows, payload_bytes), scales (rows, nblocks)): views into ``wire``."""
    lay = row_layout(spec, row_elems)
    if wire.dtype != torch.uint8 or wire.dim() != 2 or wire.shape[1] != lay.row_bytes:
        raise ValueError(
            f"split_wire: expected a uint8 (rows, {lay.row_bytes}) wire for rows of "
            f"{row_elems} elements in {spec}, got {wire.dtype} {tuple(wire.shape)}"
        )
    payload = wire[:, : lay.payload_bytes]
    if lay.nblocks == 0:  # a dtype view needs an aligned row stride, which (rows, 0) lacks
        return payload, torch.empty((wire.shape[0], 0), dtype=spec.scale_dtype, device=wire.device)
    scales = wire[:, lay.scale_offset :].view(spec.scale_dtype)
    return payload, scales


def dequantize_rows(
    payload: torch.Tensor,
    scales: torch.Tensor,
    spec: QuantSpec,
    row_elems: int,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild (rows, row_elems) of ``dtype`` from the payload and scales of a wire.

    ``out`` (contiguous, (rows, row_elems), on the payload's device) receives the values
    instead of a new tensor; its dtype is the output dtype."""
    if out is None:
        if _eager(payload):
            return _dequantize_new(payload, scales, spec, row_elems, dtype)
        return torch.ops.agoq.dequantize_blockwise(
            payload, scales, spec.bits, spec.format, spec.block, row_elems, dtype
        )
    if (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != (payload.shape[0], row_elems)
        or not out.is_contiguous()
        or out.device != payload.device
        or out.dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ):
        raise ValueError(
            f"dequantize_rows: out must be a contiguous float32/bfloat16/float16 tensor of "
            f"shape ({payload.shape[0]}, {row_elems}) on {payload.device}"
        )
    if _eager(payload) and _eager(out):
        _dequantize_into(payload, scales, spec, row_elems, out)
    else:
        torch.ops.agoq.dequantize_blockwise_into(
            payload, scales, spec.bits, spec.format, spec.block, out
        )
    return out


from . import cpu_kernels  # noqa: E402  (it imports row_layout from this module)

__all__ = [
    "RowLayout",
    "dequantize_rows",
    "make_noise",
    "quantize_rows",
    "row_layout",
    "split_wire",
]
