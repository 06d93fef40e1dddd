"""quantize(x, spec) -> Packed and dequantize(Packed) -> Tensor.

Bit layout (shared by every backend, bit for bit):

* The tensor's elements are taken in memory order when it is dense (so channels-last and
  transposed tensors need no copy), else in row-major order, and zero-padded to whole blocks.
* Each block gets one scale ``s >= absmax / max_level``, rounded *up* (to the next fp32, or
  to the next bf16 for bf16 scales) so that no scaled element leaves the code grid.
* Each element becomes a ``bits``-wide unsigned code: ``q + 2**(bits-1)`` for ``int``, the
  OCP sign/exponent/mantissa bit pattern for ``fp4_e2m1`` / ``fp8_e4m3``.
* Codes are packed LSB-first into a byte stream: code ``i`` occupies bits
  ``[i*bits, (i+1)*bits)``. Payload bytes are exactly ``padded_numel * bits / 8``.
* A block containing NaN or +-Inf stores a NaN scale, so the whole block dequantizes to NaN:
  non-finite input never comes back finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .spec import MINIFLOATS, QuantSpec

Backend = Literal["auto", "torch", "triton"]

# Blocks are processed in slabs of about this many elements on the eager path, so the fp32
# temporaries stay cache-sized and a huge activation never needs 3x its size in scratch.
_SLAB_ELEMENTS = 1 << 18

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True, eq=False)
class Packed:
    """A quantized tensor: plain tensors plus the metadata needed to rebuild it.

    ``payload`` holds the bit-packed codes (uint8), ``scales`` one scale per block.
    ``dequantize`` returns a tensor with the original ``dtype``, ``shape`` and ``stride``.
    """

    payload: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    memory_order: bool

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: payload plus scales."""
        return self.payload.numel() + self.scales.numel() * self.scales.element_size()

    @property
    def original_nbytes(self) -> int:
        """Bytes the original tensor's elements took."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def device(self) -> torch.device:
        """Device the payload lives on."""
        return self.payload.device


def check_quantizable(x: torch.Tensor) -> None:
    """Raise a clear error for inputs the codec cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"agoq.quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"agoq.quantize only takes real floating tensors (float32, float16, bfloat16, "
            f"float64); got dtype {x.dtype}"
        )
    if x.device.type == "meta":
        raise ValueError(
            "agoq.quantize got a tensor on the meta device: it has no data to quantize "
            "(materialize the module, e.g. with to_empty() and an init, first)"
        )


# ----------------------------------------------------------------------------- layout


def _dense_in_memory(x: torch.Tensor) -> bool:
    """True when the elements fill ``[offset, offset + numel)`` of storage, each once."""
    expected = 1
    for size, stride in sorted(
        ((sz, st) for sz, st in zip(x.shape, x.stride(), strict=True) if sz != 1),
        key=lambda d: d[1],
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Elements of ``x`` as a 1-D tensor, in memory order when that needs no copy."""
    if x.is_contiguous():
        return x.reshape(-1), True
    if _dense_in_memory(x):
        return x.as_strided((x.numel(),), (1,), x.storage_offset()), True
    return x.reshape(-1), False


def _restore(flat: torch.Tensor, p: Packed) -> torch.Tensor:
    if p.memory_order:
        return flat.as_strided(p.shape, p.stride)
    out = torch.empty_strided(p.shape, p.stride, dtype=flat.dtype, device=flat.device)
    out.copy_(flat.view(p.shape))
    return out


# ----------------------------------------------------------------- reference kernels


def _fp32_bits_exponent(a: torch.Tensor) -> torch.Tensor:
    """Unbiased binary exponent of non-negative fp32 values (subnormals give -127)."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact 2**e as fp32 for integer e in the normal range."""
    return ((e + 127) << 23).view(torch.float32)


def block_scales(xb: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-row scales (fp32 values exactly representable in ``spec.scale_dtype``).

    ``xb`` is fp32 of shape (blocks, block). NaN marks rows holding a non-finite value.
    """
    absmax = xb.abs().amax(dim=1)
    maxv = spec.max_level
    s = absmax / maxv
    # Round the scale up until absmax / s fits the grid: elements never need clamping,
    # which is what makes the half-step error bound hold for every element.
    s = torch.where(absmax / s > maxv, torch.nextafter(s, torch.full_like(s, math.inf)), s)
    if spec.scale_dtype == torch.bfloat16:
        bits = (s.view(torch.int32) + 0xFFFF) & -0x10000
        s = torch.clamp(bits, max=0x7F7F0000).view(torch.float32)
    return torch.where(torch.isfinite(absmax), s, torch.full_like(s, math.nan))


def _round(t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    return torch.round(t) if noise is None else torch.floor(t + noise)


def encode_block_values(
    xb: torch.Tensor, s: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None
) -> torch.Tensor:
    """Codes (uint8, one per element) of fp32 rows ``xb`` scaled by ``s``."""
    ok = torch.isfinite(s) & (s > 0)
    v = xb / torch.where(ok, s, torch.ones_like(s))[:, None]
    v = torch.where(ok[:, None], v, torch.zeros_like(v))
    if spec.format == "int":
        qmax = spec.max_level
        q = torch.clamp(_round(v, noise), -qmax, qmax)
        return (q + 2 ** (spec.bits - 1)).to(torch.uint8)
    mf = MINIFLOATS[spec.format]
    a = v.abs()
    e = torch.clamp(_fp32_bits_exponent(a), min=mf.emin)
    ulp = _pow2(e - mf.mbits)
    mag = torch.clamp(_round(a / ulp, noise) * ulp, max=mf.max_value)
    e2 = torch.clamp(_fp32_bits_exponent(mag), min=mf.emin)
    normal = mag >= 2.0**mf.emin
    field_e = torch.where(normal, e2 - mf.emin + 1, torch.zeros_like(e2))
    mant = (mag / _pow2(e2 - mf.mbits)).to(torch.int32) - torch.where(normal, 1 << mf.mbits, 0)
    sign = ((v < 0) & (mag > 0)).to(torch.int32)
    code = (sign << (spec.bits - 1)) | (field_e << mf.mbits) | mant
    return code.to(torch.uint8)


_LUT_CACHE: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def code_values(spec: QuantSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of every code (``2**bits`` entries): the decode table of the format."""
    device = torch.device(device)
    key = (spec.format, spec.bits, device)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        codes = torch.arange(2**spec.bits, dtype=torch.int32)
        if spec.format == "int":
            vals = (codes - 2 ** (spec.bits - 1)).to(torch.float32)
        else:
            mf = MINIFLOATS[spec.format]
            sign = torch.where((codes >> (spec.bits - 1)) & 1 == 1, -1.0, 1.0)
            field_e = (codes >> mf.mbits) & ((1 << mf.ebits) - 1)
            mant = (codes & ((1 << mf.mbits) - 1)).to(torch.float32)
            e = torch.where(field_e > 0, field_e + mf.emin - 1, torch.full_like(field_e, mf.emin))
            frac = torch.where(field_e > 0, 1.0 + mant / 2**mf.mbits, mant / 2**mf.mbits)
            vals = sign * frac * torch.exp2(e.to(torch.float32))
            if spec.format == "fp8_e4m3":  # the E4M3FN NaN codes; never emitted by encode
                vals = torch.where((codes & 0x7F) == 0x7F, math.nan, vals)
        lut = vals.to(device)
        _LUT_CACHE[key] = lut
    return lut


def decode_block_values(codes: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp32 rows from codes (blocks, block) and their scales."""
    if spec.format == "int":
        vals = codes.to(torch.float32) - 2 ** (spec.bits - 1)
    else:
        vals = code_values(spec, codes.device)[codes.to(torch.int64)]
    return vals * s[:, None]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits, numel a multiple of 8) LSB-first into bytes."""
    if bits == 8:
        return codes.reshape(-1)
    if bits in (2, 4):
        per = 8 // bits
        c = codes.reshape(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):
            out |= c[:, j] << (j * bits)
        return out
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (codes.reshape(-1, 8).to(torch.int64) << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: one uint8 code per element."""
    if bits == 8:
        return payload
    mask = (1 << bits) - 1
    if bits in (2, 4):
        per = 8 // bits
        return torch.stack([(payload >> (j * bits)) & mask for j in range(per)], dim=1).reshape(-1)
    byte_shifts = torch.arange(bits, device=payload.device, dtype=torch.int64) * 8
    words = (payload.reshape(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=payload.device, dtype=torch.int64) * bits
    return ((words[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1)


def finite_max(dtype: torch.dtype) -> float:
    """Largest finite value of ``dtype`` that an fp32 decode can produce."""
    return torch.finfo(dtype if dtype != torch.float64 else torch.float32).max


def _slab_rows(spec: QuantSpec) -> int:
    return max(1, _SLAB_ELEMENTS // spec.block)


def quantize_flat_torch(
    flat: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer of a 1-D tensor: returns (payload, scales)."""
    n = flat.numel()
    B = spec.block
    nblocks = -(-n // B)
    payload = torch.empty(spec.payload_nbytes(n), dtype=torch.uint8, device=flat.device)
    scales = torch.empty(nblocks, dtype=spec.scale_dtype, device=flat.device)
    step = nblocks if torch.compiler.is_compiling() else _slab_rows(spec)
    row_bytes = B * spec.bits // 8
    for r0 in range(0, nblocks, step):
        r1 = min(nblocks, r0 + step)
        chunk = flat[r0 * B : min(r1 * B, n)].to(torch.float32)
        if chunk.numel() < (r1 - r0) * B:
            chunk = torch.nn.functional.pad(chunk, (0, (r1 - r0) * B - chunk.numel()))
        xb = chunk.view(r1 - r0, B)
        s = block_scales(xb, spec)
        noise = None
        if spec.rounding == "stochastic":
            noise = torch.rand(xb.shape, generator=generator, device=xb.device)
        codes = encode_block_values(xb, s, spec, noise)
        payload[r0 * row_bytes : r1 * row_bytes] = pack_codes(codes, spec.bits)
        scales[r0:r1] = s.to(spec.scale_dtype)
    return payload, scales


def dequantize_flat_torch(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Reference dequantizer: the first ``numel`` elements, as ``dtype``."""
    B = spec.block
    nblocks = scales.numel()
    out = torch.empty(nblocks * B, dtype=dtype, device=payload.device)
    step = nblocks if torch.compiler.is_compiling() else _slab_rows(spec)
    row_bytes = B * spec.bits // 8
    fmax = finite_max(dtype)
    for r0 in range(0, nblocks, step):
        r1 = min(nblocks, r0 + step)
        codes = unpack_codes(payload[r0 * row_bytes : r1 * row_bytes], spec.bits)
        vals = decode_block_values(codes.view(r1 - r0, B), scales[r0:r1].float(), spec)
        # A scale rounded up can push the top code one ulp past the dtype's range: saturate
        # so finite input always comes back finite (clamp keeps NaN).
        vals = torch.clamp(vals, -fmax, fmax)
        out[r0 * B : r1 * B] = vals.reshape(-1)
    return out[:numel]


# ------------------------------------------------------------------------ dispatch


def _use_triton(device: torch.device, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        from . import triton_kernels

        if not triton_kernels.available(device):
            raise RuntimeError(
                f"agoq: the Triton backend cannot run on {device} here "
                f"({triton_kernels.unavailable_reason(device)})"
            )
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if device.type != "cuda":
        return False
    from . import triton_kernels

    return triton_kernels.available(device)


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> Packed:
    """Quantize a floating tensor block-wise into ``spec``; see the module doc for the layout.

    ``generator`` seeds stochastic rounding. ``backend="auto"`` uses the fused Triton
    kernels on CUDA when Triton is installed, else the pure-torch reference.
    """
    check_quantizable(x)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an agoq QuantSpec, got {type(spec).__name__}")
    flat, memory_order = _flatten(x.detach())
    if _use_triton(flat.device, backend):
        from . import triton_kernels

        payload, scales = triton_kernels.quantize_flat(flat, spec, generator=generator)
    else:
        payload, scales = quantize_flat_torch(flat, spec, generator)
    return Packed(
        payload=payload,
        scales=scales,
        spec=spec,
        shape=x.shape,
        stride=tuple(x.stride()),
        dtype=x.dtype,
        memory_order=memory_order,
    )


def dequantize(p: Packed, *, backend: Backend = "auto") -> torch.Tensor:
    """Rebuild the tensor a :class:`Packed` came from (original dtype, shape and strides)."""
    if not isinstance(p, Packed):
        raise TypeError(f"agoq.dequantize expects a Packed, got {type(p).__name__}")
    if _use_triton(p.payload.device, backend):
        from . import triton_kernels

        flat = triton_kernels.dequantize_flat(p.payload, p.scales, p.spec, p.numel, p.dtype)
    else:
        flat = dequantize_flat_torch(p.payload, p.scales, p.spec, p.numel, p.dtype)
    return _restore(flat, p)
