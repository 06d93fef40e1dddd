"""Fused Triton kernels for the codec: quantize+pack and unpack+dequantize in one pass.

They reproduce the reference layout of :mod:`agoq.quant.codec` bit for bit under nearest
rounding (IEEE division, ties-to-even, scales rounded up the same way). Stochastic rounding
uses Triton's Philox stream seeded from the caller's generator: reproducible, unbiased, but
not the same draws as the torch reference.

On CPU the kernels only run under ``TRITON_INTERPRET=1``, which must be set before this
module is first imported (Triton reads it when the kernels are decorated).
"""

from __future__ import annotations

import os

import torch

from .codec import PLANES, finite_max
from .spec import MINIFLOATS, QuantSpec

try:  # Triton is optional: the torch reference runs everywhere.
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _IMPORT_ERROR = str(exc)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per program: large tiles amortise the interpreter on CPU; on GPU 4096 fp32
# elements per program keep enough programs in flight for bandwidth.
_TILE_GPU = 4096
_TILE_INTERPRET = 1 << 16


def unavailable_reason(device: torch.device) -> str:
    """Why the Triton backend cannot run on ``device`` (empty string if it can)."""
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return ""
    if device.type == "cpu" and INTERPRET:
        return ""
    if device.type == "cpu":
        return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
    return f"no Triton support for device type {device.type!r}"


def available(device: torch.device) -> bool:
    """True when the fused kernels can run on ``device``."""
    return unavailable_reason(torch.device(device)) == ""


if triton is not None:

    @triton.jit
    def _round_half_even(t):
        f = tl.floor(t)
        d = t - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _exponent(a):
        return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127

    @triton.jit
    def _pow2(e):
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize_kernel(
        x_ptr,
        payload_ptr,
        scale_ptr,
        noise_ptr,
        row_elems,
        bpr,
        p_stride,
        s_stride,
        nblocks,
        seed,
        MAXV: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        BITS: tl.constexpr,
        IS_INT: tl.constexpr,
        MBITS: tl.constexpr,
        EMIN: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        BF16_SCALE: tl.constexpr,
        W0: tl.constexpr,
        W1: tl.constexpr,
    ):
        # Block t is block b of wire row r: its elements start at r * row_elems + b * BLOCK,
        # its payload at r * p_stride + b * BLOCK * BITS / 8, its scale at r * s_stride + b.
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        r = (rows // bpr).to(tl.int64)
        b = (rows % bpr).to(tl.int64)
        row_ok = rows < nblocks
        in_row = b[:, None] * BLOCK + cols[None, :]
        idx = r[:, None] * row_elems + in_row
        x = tl.load(x_ptr + idx, mask=row_ok[:, None] & (in_row < row_elems), other=0.0).to(
            tl.float32
        )

        a = tl.abs(x)
        nonfinite = (x != x) | (a == float("inf"))
        absmax = tl.max(tl.where(nonfinite, 0.0, a), axis=1)
        bad = tl.max(nonfinite.to(tl.int32), axis=1) > 0
        s = tl.math.div_rn(absmax, MAXV)
        over = tl.math.div_rn(absmax, s) > MAXV
        s = tl.where(over, (s.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), s)
        if BF16_SCALE:
            sbits = (s.to(tl.int32, bitcast=True) + 0xFFFF) & -0x10000
            s = tl.minimum(sbits, 0x7F7F0000).to(tl.float32, bitcast=True)
        ok = (s > 0.0) & (~bad)
        v = tl.math.div_rn(x, tl.where(ok, s, 1.0)[:, None])
        v = tl.where(bad[:, None], 0.0, v)
        if HAS_NOISE:
            nidx = rows.to(tl.int64)[:, None] * BLOCK + cols[None, :]
            noise = tl.load(noise_ptr + nidx, mask=row_ok[:, None], other=0.0)
        elif STOCHASTIC:
            noise = tl.rand(seed, idx)

        if IS_INT:
            if STOCHASTIC or HAS_NOISE:
                q = tl.floor(v + noise)
            else:
                q = _round_half_even(v)
            q = tl.minimum(tl.maximum(q, -MAXV), MAXV)
            code = (q + (1 << (BITS - 1))).to(tl.int32)
        else:
            av = tl.abs(v)
            e = tl.maximum(_exponent(av), EMIN)
            ulp = _pow2(e - MBITS)
            if STOCHASTIC or HAS_NOISE:
                rq = tl.floor(av / ulp + noise)
            else:
                rq = _round_half_even(av / ulp)
            mag = tl.minimum(rq * ulp, MAXV)
            e2 = tl.maximum(_exponent(mag), EMIN)
            normal = mag >= _pow2(tl.full(mag.shape, EMIN, tl.int32))
            field_e = tl.where(normal, e2 - EMIN + 1, 0)
            mant = (mag / _pow2(e2 - MBITS)).to(tl.int32) - tl.where(normal, 1 << MBITS, 0)
            if MBITS == 3 and not (STOCHASTIC or HAS_NOISE):
                # The reference's nearest E4M3 is torch's cast, which keeps the sign of -0.
                sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
            else:
                sign = (v < 0.0).to(tl.int32)
            code = (sign << (BITS - 1)) | (field_e << MBITS) | mant

        scale_out = tl.where(bad, float("nan"), s)
        tl.store(
            scale_ptr + r * s_stride + b, scale_out.to(scale_ptr.dtype.element_ty), mask=row_ok
        )

        row_base = (r * p_stride + b * (BLOCK * BITS // 8))[:, None]
        _store_plane(payload_ptr, row_base, 0, code, row_ok, W0, 0, ROWS, BLOCK)
        if W1 > 0:
            _store_plane(
                payload_ptr, row_base, BLOCK // (8 // W0), code, row_ok, W1, W0, ROWS, BLOCK
            )

    @triton.jit
    def _store_plane(
        payload_ptr,
        row_base,
        offset,
        code,
        row_ok,
        W: tl.constexpr,
        SHIFT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        K: tl.constexpr = 8 // W
        sub = (code >> SHIFT) & ((1 << W) - 1)
        sub3 = tl.reshape(sub, (ROWS, K, BLOCK // K))
        byte = tl.sum(sub3 << (tl.arange(0, K) * W)[None, :, None], axis=1)
        j = tl.arange(0, BLOCK // K)
        tl.store(
            payload_ptr + row_base + offset + j[None, :], byte.to(tl.uint8), mask=row_ok[:, None]
        )

    @triton.jit
    def _load_plane(
        payload_ptr,
        row_base,
        offset,
        row_ok,
        W: tl.constexpr,
        SHIFT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        K: tl.constexpr = 8 // W
        j = tl.arange(0, BLOCK // K)
        byte = tl.load(payload_ptr + row_base + offset + j[None, :], mask=row_ok[:, None], other=0)
        sub3 = (byte.to(tl.int32)[:, None, :] >> (tl.arange(0, K) * W)[None, :, None]) & (
            (1 << W) - 1
        )
        return tl.reshape(sub3, (ROWS, BLOCK)) << SHIFT

    @triton.jit
    def _dequantize_kernel(
        payload_ptr,
        scale_ptr,
        out_ptr,
        row_elems,
        bpr,
        p_stride,
        s_stride,
        nblocks,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        BITS: tl.constexpr,
        IS_INT: tl.constexpr,
        MBITS: tl.constexpr,
        EMIN: tl.constexpr,
        IS_E4M3: tl.constexpr,
        OUT_BF16: tl.constexpr,
        FMAX: tl.constexpr,
        W0: tl.constexpr,
        W1: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < nblocks
        cols = tl.arange(0, BLOCK)
        r = (rows // bpr).to(tl.int64)
        b = (rows % bpr).to(tl.int64)
        in_row = b[:, None] * BLOCK + cols[None, :]
        idx = r[:, None] * row_elems + in_row
        out_ok = row_ok[:, None] & (in_row < row_elems)
        row_base = (r * p_stride + b * (BLOCK * BITS // 8))[:, None]
        code = _load_plane(payload_ptr, row_base, 0, row_ok, W0, 0, ROWS, BLOCK)
        if W1 > 0:
            code = code | _load_plane(
                payload_ptr, row_base, BLOCK // (8 // W0), row_ok, W1, W0, ROWS, BLOCK
            )

        if IS_INT:
            val = (code - (1 << (BITS - 1))).to(tl.float32)
        else:
            sign = tl.where(((code >> (BITS - 1)) & 1) == 1, -1.0, 1.0)
            field_e = (code >> MBITS) & ((1 << (BITS - 1 - MBITS)) - 1)
            mant = (code & ((1 << MBITS) - 1)).to(tl.float32)
            frac = tl.where(field_e > 0, 1.0 + mant / (1 << MBITS), mant / (1 << MBITS))
            e = tl.where(field_e > 0, field_e + EMIN - 1, EMIN)
            val = sign * frac * _pow2(e)
            if IS_E4M3:
                val = tl.where((code & 0x7F) == 0x7F, float("nan"), val)
        s = tl.load(scale_ptr + r * s_stride + b, mask=row_ok, other=0.0).to(tl.float32)
        out = val * s[:, None]
        # Saturate like the reference; comparisons keep NaN (tl.maximum would drop it).
        out = tl.where(out > FMAX, FMAX, tl.where(out < -FMAX, -FMAX, out))
        if OUT_BF16:
            # Ties-to-even by hand (out_ptr is the int16 view of the bf16 output): the
            # interpreter's own bf16 cast does not round to even, and this matches torch.
            bits = out.to(tl.int32, bitcast=True)
            rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
            rne = tl.where(out != out, 0x7FC0, rne)
            tl.store(out_ptr + idx, rne.to(tl.int16), mask=out_ok)
        else:
            tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=out_ok)


def _rows_per_program(spec: QuantSpec, device: torch.device) -> int:
    tile = _TILE_GPU if device.type == "cuda" else _TILE_INTERPRET
    return max(1, tile // spec.block)


def _format_consts(spec: QuantSpec) -> dict:
    planes = PLANES[spec.bits] + (0,)
    consts = {"W0": planes[0], "W1": planes[1]}
    if spec.format == "int":
        return {"IS_INT": True, "MBITS": 0, "EMIN": 0, **consts}
    mf = MINIFLOATS[spec.format]
    return {"IS_INT": False, "MBITS": mf.mbits, "EMIN": mf.emin, **consts}


def _launch_quantize(
    x: torch.Tensor,
    payload: torch.Tensor,
    scales: torch.Tensor,
    spec: QuantSpec,
    noise: torch.Tensor | None,
    seed: int,
    p_stride: int,
    s_stride: int,
) -> None:
    rows_, n = x.shape
    bpr = -(-n // spec.block)
    nblocks = rows_ * bpr
    if nblocks == 0:
        return
    per = _rows_per_program(spec, x.device)
    _quantize_kernel[(triton.cdiv(nblocks, per),)](
        x,
        payload,
        scales,
        noise if noise is not None else x,
        n,
        bpr,
        p_stride,
        s_stride,
        nblocks,
        seed,
        MAXV=spec.max_level,
        BLOCK=spec.block,
        ROWS=per,
        BITS=spec.bits,
        STOCHASTIC=spec.rounding == "stochastic" and noise is None,
        HAS_NOISE=noise is not None,
        BF16_SCALE=spec.scale_dtype == torch.bfloat16,
        **_format_consts(spec),
    )


def _launch_dequantize(
    payload: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    spec: QuantSpec,
    rows_: int,
    n: int,
    p_stride: int,
    s_stride: int,
) -> None:
    bpr = -(-n // spec.block)
    nblocks = rows_ * bpr
    if nblocks == 0:
        return
    per = _rows_per_program(spec, payload.device)
    _dequantize_kernel[(triton.cdiv(nblocks, per),)](
        payload,
        scales,
        out.view(torch.int16) if out.dtype == torch.bfloat16 else out,
        n,
        bpr,
        p_stride,
        s_stride,
        nblocks,
        BLOCK=spec.block,
        ROWS=per,
        BITS=spec.bits,
        IS_E4M3=spec.format == "fp8_e4m3",
        OUT_BF16=out.dtype == torch.bfloat16,
        FMAX=finite_max(out.dtype),
        **_format_consts(spec),
    )


def quantize_rows(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None) -> torch.Tensor:
    """The codec op's wire (rows, row_bytes) of contiguous ``x`` (rows, row_elems), fused.

    With ``noise`` (the op's uniform draws) stochastic rounding gives the reference's bits."""
    from .ops import row_layout

    rows_, n = x.shape
    lay = row_layout(spec, n)
    wire = torch.zeros((rows_, lay.row_bytes), dtype=torch.uint8, device=x.device)
    if rows_ and lay.nblocks:
        scales = wire[:, lay.scale_offset :].view(spec.scale_dtype)
        _launch_quantize(
            x, wire, scales, spec, noise, 0, lay.row_bytes, scales.stride(0) if rows_ > 1 else 0
        )
    return wire


def dequantize_rows(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, n: int, out: torch.Tensor
) -> None:
    """Write rows (rows, n) into contiguous ``out`` from row-strided payload and scales views."""
    rows_ = payload.shape[0]
    if rows_ and n:
        _launch_dequantize(
            payload,
            scales,
            out,
            spec,
            rows_,
            n,
            payload.stride(0) if rows_ > 1 else 0,
            scales.stride(0) if rows_ > 1 else 0,
        )


def quantize_flat(
    flat: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused quantize+pack of a 1-D tensor: returns (payload, scales) in the codec layout.

    Stochastic rounding draws from Triton's Philox stream, seeded from ``generator``."""
    n = flat.numel()
    nblocks = -(-n // spec.block)
    payload = torch.empty(spec.payload_nbytes(n), dtype=torch.uint8, device=flat.device)
    scales = torch.empty(nblocks, dtype=spec.scale_dtype, device=flat.device)
    seed = 0
    if spec.rounding == "stochastic":
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device="cpu"))
    _launch_quantize(flat.contiguous().view(1, -1), payload, scales, spec, None, seed, 0, 0)
    return payload, scales


def dequantize_flat(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Fused unpack+dequantize: the first ``numel`` elements as ``dtype``."""
    out = torch.empty(numel, dtype=dtype, device=payload.device)
    _launch_dequantize(payload, scales, out, spec, 1, numel, 0, 0)
    return out
