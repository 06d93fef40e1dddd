"""quantize(x, spec) -> Packed and dequantize(Packed) -> Tensor.

Bit layout (shared by every backend, bit for bit):

* The tensor's elements are taken in memory order when it is dense (so channels-last and
  transposed tensors need no copy), else in row-major order, and zero-padded to whole blocks.
* Each block gets one scale ``s >= absmax / max_level``, rounded *up* (to the next fp32, or
  to the next bf16 for bf16 scales) so that no scaled element leaves the code grid.
* Each element becomes a ``bits``-wide unsigned code: ``q + 2**(bits-1)`` for ``int``, the
  OCP sign/exponent/mantissa bit pattern for ``fp4_e2m1`` / ``fp8_e4m3``.
* Codes are bit-packed per block in bit planes (see ``PLANES``); a block's ``block * bits / 8``
  bytes are contiguous. Payload bytes are exactly ``padded_numel * bits / 8``.
* A block containing NaN or +-Inf stores a NaN scale, so the whole block dequantizes to NaN:
  non-finite input never comes back finite.
* A DTensor is quantized through its local tensor (each rank stores its own shard, so the
  byte count is the local one); dequantize rebuilds the DTensor on the same mesh, with the
  same placements, global shape and stride.
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from .spec import MINIFLOATS, QuantSpec

Backend = Literal["auto", "torch", "triton"]

# Blocks are processed in slabs of about this many elements on the eager path, so the fp32
# temporaries stay cache-sized and a huge activation never needs 3x its size in scratch.
_SLAB_ELEMENTS = 1 << 18

# float64 is refused, not squeezed through the fp32 codec (1e-50 would come back 0, 1e300
# NaN): the activation context keeps float64 tensors as they are.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_DTENSOR_MODULE = "torch.distributed.tensor"


@dataclass(frozen=True)
class DTensorLayout:
    """Where a quantized DTensor's local tensor belongs: mesh, placements, global geometry."""

    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]


def is_dtensor(x: object) -> bool:
    """True when ``x`` is a ``torch.distributed.tensor.DTensor``."""
    # A DTensor can only exist once its module is imported; importing it here would pull
    # much of torch.distributed (private modules too) into every ``import agoq``.
    mod = sys.modules.get(_DTENSOR_MODULE)
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(x, cls)


@dataclass(frozen=True, eq=False)
class Packed:
    """A quantized tensor: plain tensors plus the metadata needed to rebuild it.

    ``payload`` holds the bit-packed codes (uint8), ``scales`` one scale per block.
    ``dequantize`` returns a tensor with the original ``dtype``, ``shape`` and ``stride``.
    For a DTensor, ``shape``/``stride`` are its local tensor's and ``dtensor`` says how to
    rebuild the DTensor around it.
    """

    payload: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    memory_order: bool
    dtensor: DTensorLayout | None = None

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

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first field inconsistent with the
        spec: payload dtype and exact byte count, scale dtype and count, shape/stride, device.

        Metadata only (no data pass, no host sync). Under ``torch.compile`` with symbolic
        sizes, the size checks become run-time asserts of the graph (``torch._check``).
        """
        _validate_packed(self)


def check_quantizable(x: torch.Tensor) -> None:
    """Raise a clear error for inputs the codec cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"agoq.quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float64:
        raise TypeError(
            "agoq.quantize does not take float64 tensors (got dtype torch.float64): the codec "
            "computes in fp32, which would flush tiny values to 0 and overflow huge ones; "
            "cast to float32 first or keep the tensor unquantized"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"agoq.quantize only takes real floating tensors (float32, float16, bfloat16); "
            f"got dtype {x.dtype}"
        )
    if x.device.type == "meta":
        raise ValueError(
            "agoq.quantize got a tensor on the meta device: it has no data to quantize "
            "(materialize the module, e.g. with to_empty() and an init, first)"
        )


def _bad(field: str, msg: str) -> ValueError:
    return ValueError(f"agoq.dequantize: Packed.{field} {msg}")


def _require(ok: bool | torch.SymBool, error: ValueError) -> None:
    """Raise ``error`` unless ``ok``; a symbolic condition (under compile) is asserted at
    run time by the graph instead of being decided (and guarded on) while tracing."""
    if isinstance(ok, bool):
        if not ok:
            raise error
    else:
        torch._check(ok, lambda: str(error))


# Packed objects made by quantize(): their metadata (frozen fields) is right by
# construction, so dequantize only re-checks what can still change, the tensors' sizes and
# dtypes (the full check costs more than dequantizing a small activation).
_TRUSTED: weakref.WeakSet[Packed] = weakref.WeakSet()


def _validate_packed(p: Packed) -> None:
    if p in _TRUSTED:
        spec, n = p.spec, p.numel
        if (
            p.payload.dtype == torch.uint8
            and p.scales.dtype == spec.scale_dtype
            and p.payload.numel() == spec.payload_nbytes(n)
            and p.scales.numel() == -(-n // spec.block)
            and p.payload.device == p.scales.device
        ):
            return
    _validate_full(p)


def _validate_full(p: Packed) -> None:
    if not isinstance(p.spec, QuantSpec):
        raise TypeError(f"agoq.dequantize: Packed.spec must be a QuantSpec, got {p.spec!r}")
    for name in ("payload", "scales"):
        if not isinstance(getattr(p, name), torch.Tensor):
            raise TypeError(
                f"agoq.dequantize: Packed.{name} must be a tensor, got "
                f"{type(getattr(p, name)).__name__}"
            )
    if p.dtype not in _FLOAT_DTYPES:
        raise _bad("dtype", f"must be one of {list(_FLOAT_DTYPES)}, got {p.dtype!r}")
    if not isinstance(p.memory_order, bool):
        raise _bad("memory_order", f"must be a bool, got {p.memory_order!r}")
    if p.dtensor is not None and not isinstance(p.dtensor, DTensorLayout):
        raise TypeError(
            f"agoq.dequantize: Packed.dtensor must be a DTensorLayout or None, got {p.dtensor!r}"
        )
    payload, scales, spec = p.payload, p.scales, p.spec
    if payload.dtype != torch.uint8:
        raise _bad("payload", f"must be uint8, got {payload.dtype}")
    if scales.dtype != spec.scale_dtype:
        raise _bad(
            "scales", f"dtype {scales.dtype} does not match spec.scale_dtype {spec.scale_dtype}"
        )
    if payload.device != scales.device:
        raise _bad("scales", f"are on {scales.device} but the payload is on {payload.device}")
    if payload.dim() != 1 or scales.dim() != 1:
        raise _bad("payload", f"and scales must be 1-D, got {payload.dim()}-D and {scales.dim()}-D")
    shape, stride = tuple(p.shape), tuple(p.stride)
    if len(shape) != len(stride):
        raise _bad("stride", f"{stride} has {len(stride)} dims but shape {shape} has {len(shape)}")
    static = all(isinstance(v, int) and not isinstance(v, bool) for v in shape + stride)
    if static:
        if any(v < 0 for v in shape + stride):
            raise _bad("shape", f"{shape} / stride {stride} has a negative entry")
        if p.memory_order and math.prod(shape) and not _dense_in_memory(shape, stride):
            raise _bad(
                "stride", f"{stride} is not a dense layout of shape {shape} (memory_order=True)"
            )
        if payload.numel() > 1 and payload.stride(0) != 1:
            raise _bad("payload", "must be contiguous")
    numel = math.prod(shape)
    nblocks = -(-numel // spec.block)
    _require(
        payload.numel() == spec.payload_nbytes(numel),
        _bad(
            "payload",
            f"holds {payload.numel()} bytes but {numel} elements at {spec.bits} bits in blocks "
            f"of {spec.block} need exactly {spec.payload_nbytes(numel)}",
        ),
    )
    _require(
        scales.numel() == nblocks,
        _bad("scales", f"holds {scales.numel()} scales but {numel} elements need {nblocks}"),
    )


# ----------------------------------------------------------------------------- layout


def _dense_in_memory(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when the elements fill ``[offset, offset + numel)`` of storage, each once."""
    expected = 1
    for size, st in sorted(
        ((sz, st) for sz, st in zip(shape, stride, strict=True) if sz != 1),
        key=lambda d: d[1],
    ):
        if st != expected:
            return False
        expected *= size
    return True


def _non_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when no two elements of the layout share a storage location."""
    extent = 0  # furthest offset reached by the dims seen so far
    for size, st in sorted(
        ((sz, st) for sz, st in zip(shape, stride, strict=True) if sz > 1), key=lambda d: d[1]
    ):
        if st <= extent:
            return False
        extent += (size - 1) * st
    return True


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Elements of ``x`` as a 1-D tensor, in memory order when that needs no copy."""
    if x.is_contiguous():
        return x.reshape(-1), True
    if _dense_in_memory(tuple(x.shape), tuple(x.stride())):
        return x.as_strided((x.numel(),), (1,), x.storage_offset()), True
    return x.reshape(-1), False


def _restore(flat: torch.Tensor, p: Packed) -> torch.Tensor:
    if p.memory_order:
        return flat.as_strided(p.shape, p.stride)
    sizes = (*p.shape, *p.stride)
    if all(type(v) is int for v in sizes) and not _non_overlapping(tuple(p.shape), p.stride):
        # An expanded (stride-0) or otherwise self-overlapping original cannot be written
        # back element by element: the values come back in a contiguous layout instead.
        return flat.view(p.shape)
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
    # Rows with a NaN scale hold NaN/Inf: give them the zero code (an all-zero row, scale 0,
    # keeps its signed zeros, as every backend does). Eagerly this full pass is skipped when
    # no row needs it (the common case).
    if torch.compiler.is_compiling() or bool(torch.isnan(s).any()):
        v = torch.where(torch.isnan(s)[:, None], torch.zeros_like(v), v)
    if spec.format == "int":
        qmax = spec.max_level
        # In place: v is this function's own temporary.
        v = v.add_(noise).floor_() if noise is not None else v.round_()
        return v.clamp_(-qmax, qmax).add_(2 ** (spec.bits - 1)).to(torch.uint8)
    if noise is None and spec.format == "fp8_e4m3":
        # torch's cast rounds to nearest-even on the E4M3FN grid: the same codes, one op.
        return v.to(torch.float8_e4m3fn).view(torch.uint8)
    if noise is None and spec.format == "fp4_e2m1":
        return _encode_e2m1_nearest(v)
    mf = MINIFLOATS[spec.format]
    a = v.abs()
    e = torch.clamp(_fp32_bits_exponent(a), min=mf.emin)
    ulp = _pow2(e - mf.mbits)
    mag = torch.clamp(_round(a / ulp, noise) * ulp, max=mf.max_value)
    e2 = torch.clamp(_fp32_bits_exponent(mag), min=mf.emin)
    normal = mag >= 2.0**mf.emin
    field_e = torch.where(normal, e2 - mf.emin + 1, torch.zeros_like(e2))
    mant = (mag / _pow2(e2 - mf.mbits)).to(torch.int32) - torch.where(normal, 1 << mf.mbits, 0)
    sign = (v < 0).to(torch.int32)
    code = (sign << (spec.bits - 1)) | (field_e << mf.mbits) | mant
    return code.to(torch.uint8)


_E2M1_SUBNORMAL_MAGIC = 2.0**22  # fp32 ulp of 2**22 is 0.5, E2M1's subnormal step


def _encode_e2m1_nearest(v: torch.Tensor) -> torch.Tensor:
    """Nearest-even E2M1 codes of ``|v| <= 6`` via fp32 bit arithmetic (fast on CPU)."""
    a = v.abs()
    # Normal range [1, 6]: round the fp32 mantissa to one bit, ties to even; a carry into
    # the exponent is the correct next binade.
    bits = a.view(torch.int32)
    rounded = (bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22
    normal_code = rounded - (126 << 1)
    # Subnormal range [0, 1): multiples of 0.5, ties to even by the magic-number trick.
    sub = (a + _E2M1_SUBNORMAL_MAGIC) - _E2M1_SUBNORMAL_MAGIC
    code = torch.where(a >= 1.0, normal_code, (sub * 2).to(torch.int32))
    # |v| in [0.75, 1) rounds up to 1.0 = code 2, which the subnormal path already gives.
    return (code | ((v < 0).to(torch.int32) << 3)).to(torch.uint8)


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
        vals = codes.to(torch.float32).sub_(2 ** (spec.bits - 1))
    elif torch.compiler.is_compiling():
        # No table under compile: a captured constant tensor cannot be inlined into the
        # backward graph by AOTAutograd's saved-tensor-hook inlining.
        vals = _decode_minifloat(codes.to(torch.int32), spec)
    else:
        vals = code_values(spec, codes.device)[codes.to(torch.int64)]
    return vals.mul_(s[:, None])


def _decode_minifloat(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Arithmetic decode of sign/exponent/mantissa codes (same values as the table)."""
    mf = MINIFLOATS[spec.format]
    sign = 1.0 - 2.0 * ((codes >> (spec.bits - 1)) & 1).to(torch.float32)
    field_e = (codes >> mf.mbits) & ((1 << mf.ebits) - 1)
    mant = (codes & ((1 << mf.mbits) - 1)).to(torch.float32) / (1 << mf.mbits)
    normal = field_e > 0
    frac = torch.where(normal, 1.0 + mant, mant)
    e = torch.where(normal, field_e + (mf.emin - 1), torch.full_like(field_e, mf.emin))
    vals = sign * frac * _pow2(e)
    if spec.format == "fp8_e4m3":  # the E4M3FN NaN codes; never emitted by encode
        vals = torch.where((codes & 0x7F) == 0x7F, torch.full_like(vals, math.nan), vals)
    return vals


# A ``bits``-wide code is split into bit planes of width 8, 4, 2 or 1 (low bits first):
# 3 = 2+1, 5 = 4+1, 6 = 4+2. A plane of width w packs k = 8 // w codes per byte *planar*
# within the block: byte j holds codes j, j + B/k, ..., j + (k-1)B/k at bit offsets
# 0, w, ..., (k-1)w. Contiguous slices combine into contiguous bytes, so every backend
# (eager, inductor C++, Triton) vectorises it, and a block's bytes stay contiguous, so a
# payload splits at block boundaries (the all-to-all of the gradient reduction needs this).
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of shape (blocks, block), each < 2**bits, into (blocks, block*bits/8)."""
    rows, block = codes.shape
    if bits == 8:
        return codes
    planes = []
    shift = 0
    for w in PLANES[bits]:
        k = 8 // w
        sub = codes if w == bits else (codes >> shift) & ((1 << w) - 1)
        sub = sub.view(rows, k, block // k)
        byte = sub[:, 0].clone()
        for j in range(1, k):
            byte |= sub[:, j] << (j * w)
        planes.append(byte)
        shift += w
    return torch.cat(planes, dim=1) if len(planes) > 1 else planes[0]


def unpack_codes(payload: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (blocks, block) uint8 codes from the packed rows."""
    rows = payload.numel() * 8 // (bits * block)
    payload = payload.view(rows, block * bits // 8)
    if bits == 8:
        return payload
    codes = None
    offset = shift = 0
    for w in PLANES[bits]:
        k = 8 // w
        byte = payload[:, offset : offset + block // k]
        mask = (1 << w) - 1
        shifts = torch.arange(0, 8, w, dtype=torch.uint8, device=payload.device)
        part = ((byte[:, None, :] >> shifts[None, :, None]) & mask).view(rows, block)
        codes = part if codes is None else codes | (part << shift)
        offset += block // k
        shift += w
    return codes


def finite_max(dtype: torch.dtype) -> float:
    """Largest finite value of ``dtype`` (an fp32 decode never exceeds fp32's)."""
    return torch.finfo(dtype).max


def _slab_rows(spec: QuantSpec) -> int:
    return max(1, _SLAB_ELEMENTS // spec.block)


def _quantize_rows(
    xb: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed rows, scales) of fp32 rows ``xb`` (blocks, block)."""
    s = block_scales(xb, spec)
    noise = None
    if spec.rounding == "stochastic":
        noise = torch.rand(xb.shape, generator=generator, device=xb.device)
    codes = encode_block_values(xb, s, spec, noise)
    return pack_codes(codes, spec.bits).reshape(-1), s.to(spec.scale_dtype)


def _dequantize_rows(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> torch.Tensor:
    codes = unpack_codes(payload, spec.bits, spec.block)
    vals = decode_block_values(codes, scales.float(), spec)
    # A scale rounded up can push the top code one ulp past the dtype's range: saturate so
    # finite input always comes back finite (clamp keeps NaN).
    return vals.clamp_(-finite_max(dtype), finite_max(dtype)).reshape(-1).to(dtype)


def quantize_flat_torch(
    flat: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer of a 1-D tensor: returns (payload, scales)."""
    n = flat.numel()
    B = spec.block
    if torch.compiler.is_compiling():
        # One loop-free expression of the sizes, so dynamic shapes need no recompile and
        # inductor fuses it; the bits are those of the eager slabs.
        xb = torch.nn.functional.pad(flat.to(torch.float32), (0, (-n) % B)).view(-1, B)
        return _quantize_rows(xb, spec, generator)
    nblocks = -(-n // B)
    payload = torch.empty(spec.payload_nbytes(n), dtype=torch.uint8, device=flat.device)
    scales = torch.empty(nblocks, dtype=spec.scale_dtype, device=flat.device)
    step = _slab_rows(spec)
    row_bytes = B * spec.bits // 8
    for r0 in range(0, nblocks, step):
        r1 = min(nblocks, r0 + step)
        chunk = flat[r0 * B : min(r1 * B, n)].to(torch.float32)
        if chunk.numel() < (r1 - r0) * B:
            chunk = torch.nn.functional.pad(chunk, (0, (r1 - r0) * B - chunk.numel()))
        rows, s = _quantize_rows(chunk.view(r1 - r0, B), spec, generator)
        payload[r0 * row_bytes : r1 * row_bytes] = rows
        scales[r0:r1] = s
    return payload, scales


def dequantize_flat_torch(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Reference dequantizer: the first ``numel`` elements, as ``dtype``."""
    B = spec.block
    if torch.compiler.is_compiling():
        return _dequantize_rows(payload, scales, spec, dtype)[:numel]
    nblocks = scales.numel()
    out = torch.empty(nblocks * B, dtype=dtype, device=payload.device)
    step = _slab_rows(spec)
    row_bytes = B * spec.bits // 8
    for r0 in range(0, nblocks, step):
        r1 = min(nblocks, r0 + step)
        out[r0 * B : r1 * B] = _dequantize_rows(
            payload[r0 * row_bytes : r1 * row_bytes], scales[r0:r1], spec, dtype
        )
    return out[:numel]


# ------------------------------------------------------------------------ dispatch


def _resolve(device: torch.device, backend: Backend) -> str:
    """The implementation to run: "op" (the codec op, for "auto"), "torch" or "triton"."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton":
        from . import triton_kernels

        if not triton_kernels.available(device):
            raise RuntimeError(
                f"agoq: the Triton backend cannot run on {device} here "
                f"({triton_kernels.unavailable_reason(device)})"
            )
    return "op" if backend == "auto" else backend


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> Packed:
    """Quantize a floating tensor block-wise into ``spec``; see the module doc for the layout.

    ``generator`` seeds stochastic rounding. ``backend="auto"`` runs the codec op
    (``torch.ops.agoq.quantize_blockwise``: fused Triton on CUDA, the fused C kernel on CPU);
    ``"torch"`` forces the pure-torch reference and ``"triton"`` the Triton kernels. The
    payload and scales are views of one buffer (the op's wire row).
    """
    layout = None
    if is_dtensor(x):
        # Quantize this rank's shard; a plain tensor op on the DTensor itself would mix
        # DTensor and torch.Tensor arguments (aten.copy_ refuses that).
        layout = DTensorLayout(x.device_mesh, tuple(x.placements), x.shape, tuple(x.stride()))
        x = x.detach().to_local()
    check_quantizable(x)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an agoq QuantSpec, got {type(spec).__name__}")
    flat, memory_order = _flatten(x.detach())
    impl = _resolve(flat.device, backend)
    if impl == "triton":
        from . import triton_kernels

        payload, scales = triton_kernels.quantize_flat(flat, spec, generator=generator)
    elif impl == "torch":
        payload, scales = quantize_flat_torch(flat, spec, generator)
    else:
        from . import ops

        n = flat.numel()
        wire = ops.quantize_rows(flat.view(1, n), spec, generator=generator).view(-1)
        lay = ops.row_layout(spec, n)
        payload = wire[: lay.payload_bytes]
        scales = (
            wire[lay.scale_offset :].view(spec.scale_dtype)
            if lay.nblocks
            else wire[:0].view(spec.scale_dtype)
        )
    packed = Packed(
        payload=payload,
        scales=scales,
        spec=spec,
        shape=x.shape,
        stride=tuple(x.stride()),
        dtype=x.dtype,
        memory_order=memory_order,
        dtensor=layout,
    )
    if not torch.compiler.is_compiling():
        _TRUSTED.add(packed)
    return packed


def dequantize(p: Packed, *, backend: Backend = "auto") -> torch.Tensor:
    """Rebuild the tensor a :class:`Packed` came from (original dtype, shape and strides;
    a DTensor again for a quantized DTensor)."""
    if not isinstance(p, Packed):
        raise TypeError(f"agoq.dequantize expects a Packed, got {type(p).__name__}")
    _validate_packed(p)
    impl = _resolve(p.payload.device, backend)
    if impl == "triton":
        from . import triton_kernels

        flat = triton_kernels.dequantize_flat(p.payload, p.scales, p.spec, p.numel, p.dtype)
    elif impl == "torch":
        flat = dequantize_flat_torch(p.payload, p.scales, p.spec, p.numel, p.dtype)
    else:
        from . import ops

        flat = ops.dequantize_rows(
            p.payload.view(1, -1), p.scales.view(1, -1), p.spec, p.numel, p.dtype
        ).view(-1)
    out = _restore(flat, p)
    if p.dtensor is not None:
        lay = p.dtensor
        from torch.distributed.tensor import DTensor

        out = DTensor.from_local(
            out, lay.mesh, lay.placements, run_check=False, shape=lay.shape, stride=lay.stride
        )
    return out
