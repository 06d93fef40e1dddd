"""The codec's contract, checked against independent references (see quant_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agoq import Packed, QuantSpec, dequantize, quantize
from agoq.quant.codec import pack_codes, unpack_codes
from quant_reference import (
    ALL_SPECS,
    E2M1_MAGNITUDES,
    grid,
    local_gap,
    output_tolerance,
    pack_bits_python,
    scales_per_element,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKS = [16, 32, 64, 128, 256, 1024, 4096]


# ------------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 7}, "bits"),
        ({"bits": 1}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"format": "fp4_e2m1", "bits": 8}, "bits"),
        ({"format": "fp8_e4m3", "bits": 4}, "bits"),
        ({"format": "nf4"}, "format"),
        ({"block": 100}, "block"),
        ({"block": 8}, "block"),
        ({"block": 8192}, "block"),
        ({"rounding": "up"}, "rounding"),
        ({"scale_dtype": torch.float16}, "scale_dtype"),
    ],
)
def test_invalid_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}"):
        QuantSpec(**kwargs)


def test_spec_defaults_and_cost():
    s = QuantSpec()
    assert (s.bits, s.format, s.block, s.rounding, s.scale_dtype) == (
        4,
        "int",
        128,
        "nearest",
        torch.float32,
    )
    assert s.bits_per_element == 4 + 32 / 128
    assert QuantSpec(bits=4, scale_dtype=torch.bfloat16).bits_per_element == 4 + 16 / 128


# -------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("block", [16, 64])
def test_pack_layout_matches_documented_bit_planes(bits, block):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, block), generator=g, dtype=torch.int64)
    packed = pack_codes(codes.to(torch.uint8), bits)
    assert packed.shape == (3, block * bits // 8)
    assert bytes(packed.reshape(-1).tolist()) == pack_bits_python(
        codes.reshape(-1).tolist(), bits, block
    )
    assert torch.equal(unpack_codes(packed.reshape(-1), bits, block), codes.to(torch.uint8))


@pytest.mark.parametrize(("fmt", "bits"), ALL_SPECS)
@pytest.mark.parametrize("numel", [1, 15, 128, 1000, 4097])
def test_payload_bytes_are_exact(fmt, bits, numel):
    spec = QuantSpec(bits=bits, format=fmt, block=64)
    p = quantize(torch.randn(numel), spec)
    padded = math.ceil(numel / 64) * 64
    assert p.payload.dtype == torch.uint8
    assert p.payload.numel() == math.ceil(padded * bits / 8) == spec.payload_nbytes(numel)
    assert p.scales.numel() == padded // 64
    assert p.nbytes == p.payload.numel() + 4 * p.scales.numel() == spec.nbytes(numel)


def test_odd_widths_really_are_smaller():
    x = torch.randn(4096)
    sizes = {b: quantize(x, QuantSpec(bits=b)).payload.numel() for b in (2, 3, 4, 5, 6, 8)}
    assert sizes == {b: 4096 * b // 8 for b in sizes}
    assert sizes[3] < sizes[4] < sizes[5] < sizes[6] < sizes[8]


# --------------------------------------------------------------- error bound


def _assert_within_half_step(x: torch.Tensor, y: torch.Tensor, p: Packed, spec: QuantSpec):
    xf = x.reshape(-1).double()
    yf = y.reshape(-1).double()
    s = scales_per_element(p.scales, spec.block, xf.numel())
    amax = xf.abs().reshape(-1)
    # The scale is the block absmax over the top level, rounded up by at most one unit of
    # the scale dtype (fp32 division may land half an ulp under the exact quotient).
    blocks = torch.nn.functional.pad(amax, (0, (-amax.numel()) % spec.block))
    absmax = blocks.view(-1, spec.block).amax(1)
    ideal = absmax / spec.max_level
    if spec.scale_dtype == torch.bfloat16:  # documented saturation at bf16's largest finite
        ideal = ideal.clamp(max=torch.finfo(torch.bfloat16).max)
    sc = p.scales.double()
    rel = 2.0**-7 if spec.scale_dtype == torch.bfloat16 else 2.0**-22
    assert torch.all(sc >= ideal * (1 - 2.0**-23)), "scale rounded down"
    ulp_min = 2.0**-133 if spec.scale_dtype == torch.bfloat16 else 2.0**-149
    assert torch.all(sc <= ideal * (1 + rel) + ulp_min)
    v = torch.where(s > 0, xf / s, torch.zeros_like(xf))
    bound = 0.5 * local_gap(spec, v) * s * (1 + 1e-6) + output_tolerance(y).reshape(-1)
    err = (yf - xf).abs()
    worst = torch.argmax(err - bound)
    assert torch.all(err <= bound), (
        f"element {int(worst)}: x={xf[worst].item()!r} y={yf[worst].item()!r} "
        f"err={err[worst].item()!r} > bound={bound[worst].item()!r}"
    )


@st.composite
def _cases(draw):
    fmt, bits = draw(st.sampled_from(ALL_SPECS))
    dtype = draw(st.sampled_from(DTYPES))
    block = draw(st.sampled_from(BLOCKS))
    scale_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    shape = draw(st.lists(st.integers(1, 24), min_size=0, max_size=3))
    lo, hi = (-24, 15) if dtype == torch.float16 else (-140, 120)
    exponent = draw(st.integers(lo, hi))
    tail = draw(st.sampled_from(["normal", "student_t", "zeros_and_outlier"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return QuantSpec(bits, fmt, block, "nearest", scale_dtype), dtype, shape, exponent, tail, seed


def _make(shape, exponent, tail, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if tail == "student_t":
        chi = torch.randn((3, *shape), generator=g, dtype=torch.float64).pow(2).sum(0)
        x = x / torch.sqrt(chi / 3)
    elif tail == "zeros_and_outlier" and x.numel():
        x = torch.where(torch.rand(shape, generator=g) < 0.7, 0.0, x)
        x.view(-1)[0] = 1e3
    x = x * 2.0**exponent
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_nearest_within_half_step(case):
    spec, dtype, shape, exponent, tail, seed = case
    x = _make(shape, exponent, tail, seed, dtype)
    p = quantize(x, spec)
    y = dequantize(p)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    _assert_within_half_step(x, y, p, spec)


@pytest.mark.parametrize(("fmt", "bits"), ALL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_magnitudes(fmt, bits, dtype):
    fi = torch.finfo(dtype)
    x = torch.tensor(
        [fi.max, -fi.max, fi.tiny, fi.smallest_normal / 4, 0.0, -fi.tiny * 3] + [1.0] * 10,
        dtype=dtype,
    )
    for block_vals in (x, x[2:], x[3:5]):
        spec = QuantSpec(bits=bits, format=fmt, block=16)
        p = quantize(block_vals, spec)
        y = dequantize(p)
        assert torch.isfinite(y).all()
        _assert_within_half_step(block_vals, y, p, spec)


@pytest.mark.parametrize(("fmt", "bits"), ALL_SPECS)
def test_nearest_codes_match_independent_grid(fmt, bits):
    """Every code decodes to a nearest grid point of x/scale (fp32, exact grid)."""
    spec = QuantSpec(bits=bits, format=fmt, block=32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32 * 40, generator=g) * torch.logspace(-2, 2, 32).repeat(40)
    p = quantize(x, spec)
    s = scales_per_element(p.scales, 32, x.numel())
    v = x.double() / s
    q = dequantize(p).double() / s
    grd = grid(spec)
    dist = (v[:, None] - grd[None, :]).abs()
    nearest = dist.min(dim=1).values
    # fp32 quotients may break near-ties differently from this float64 check.
    slack = 1e-6 * v.abs().clamp(min=1.0)
    assert torch.all((q - v).abs() <= nearest + slack)
    on_grid = (q[:, None] - grd[None, :]).abs().min(dim=1).values
    assert torch.all(on_grid <= 1e-6 * q.abs().clamp(min=1.0))


def test_fp8_codes_are_e4m3fn_bit_patterns():
    spec = QuantSpec(bits=8, format="fp8_e4m3", block=128)
    x = torch.randn(128 * 16, generator=torch.Generator().manual_seed(3))
    p = quantize(x, spec)
    s = p.scales.repeat_interleave(128)
    expected = (x / s).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(p.payload, expected)


def test_fp4_codes_are_e2m1_bit_patterns():
    spec = QuantSpec(bits=4, format="fp4_e2m1", block=16)
    mags = torch.tensor(E2M1_MAGNITUDES)
    x = torch.cat([mags, -mags])  # absmax 6 -> scale exactly 1
    p = quantize(x, spec)
    codes = unpack_codes(p.payload, 4, 16).reshape(-1)
    expected = list(range(8)) + [0] + list(range(9, 16))  # -0 is stored as +0
    assert p.scales.item() == 1.0
    assert codes.tolist() == expected


def test_all_zero_block_is_exact_zero():
    for fmt, bits in ALL_SPECS:
        x = torch.zeros(3, 64)
        x[2] = torch.randn(64)
        p = quantize(x, QuantSpec(bits=bits, format=fmt, block=64))
        y = dequantize(p)
        assert torch.equal(y[:2], torch.zeros(2, 64)) and not torch.signbit(y[:2]).any()
        assert p.scales[:2].eq(0).all()


# ----------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize(
    ("fmt", "bits"), [("int", 2), ("int", 4), ("fp4_e2m1", 4), ("fp8_e4m3", 8)]
)
def test_stochastic_rounding_is_unbiased(fmt, bits):
    spec = QuantSpec(bits=bits, format=fmt, block=64, rounding="stochastic")
    x = torch.randn(4 * 64, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(1234)
    draws = 3000
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        p = quantize(x, spec, generator=gen)
        total += dequantize(p).double() - x.double()
    mean_err = total / draws
    s = scales_per_element(p.scales, 64, x.numel())
    gap = local_gap(spec, x.double() / s) * s
    stderr = gap / (2 * math.sqrt(draws))  # the largest std of a two-point rounding
    assert torch.all(mean_err.abs() <= 5 * stderr + 1e-12)
    # Round-to-nearest on the same data is biased: the test above can fail.
    nearest = QuantSpec(bits=bits, format=fmt, block=64)
    bias = dequantize(quantize(x, nearest)).double() - x.double()
    assert (bias.abs() > 5 * stderr).float().mean() > 0.3


def test_stochastic_rounding_is_reproducible():
    spec = QuantSpec(bits=4, rounding="stochastic")
    x = torch.randn(1000)
    a = quantize(x, spec, generator=torch.Generator().manual_seed(5))
    b = quantize(x, spec, generator=torch.Generator().manual_seed(5))
    c = quantize(x, spec, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.payload, b.payload)
    assert not torch.equal(a.payload, c.payload)


# ---------------------------------------------------------------- special values


@pytest.mark.parametrize(("fmt", "bits"), ALL_SPECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_non_finite_poisons_only_its_block(fmt, bits, bad, scale_dtype):
    x = torch.randn(4, 32)
    x[1, 7] = bad
    p = quantize(x, QuantSpec(bits=bits, format=fmt, block=32, scale_dtype=scale_dtype))
    y = dequantize(p)
    assert torch.isnan(y[1]).all(), "a block holding NaN/Inf must come back all NaN"
    assert torch.isfinite(y[[0, 2, 3]]).all()
    assert torch.isnan(p.scales[1]) and torch.isfinite(p.scales[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_never_comes_back_finite_in_low_precision(dtype):
    x = torch.full((70,), float("nan"), dtype=dtype)
    x[::3] = 1.0
    y = dequantize(quantize(x, QuantSpec(bits=4, block=16)))
    assert not torch.isfinite(y[torch.isnan(x)]).any()


# ------------------------------------------------------------------ layouts


def _roundtrip(x: torch.Tensor, spec: QuantSpec | None = None) -> torch.Tensor:
    y = dequantize(quantize(x, spec or QuantSpec(bits=8, block=16)))
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
    return y


def test_empty_and_scalar():
    for x in (torch.empty(0), torch.empty(3, 0, 2), torch.tensor(2.5), torch.tensor(-0.0)):
        y = _roundtrip(x)
        assert torch.allclose(y, x, atol=0.02)
    p = quantize(torch.empty(0, 4), QuantSpec())
    assert p.nbytes == 0


def test_transposed_input_is_quantized_in_memory_order():
    base = torch.randn(40, 24)
    spec = QuantSpec(bits=4, block=16)
    y = _roundtrip(base.t(), spec)
    assert torch.equal(y, dequantize(quantize(base, spec)).t())


def test_channels_last_input_keeps_its_strides():
    x = torch.randn(2, 5, 6, 4).to(memory_format=torch.channels_last)
    spec = QuantSpec(bits=4, block=16)
    y = _roundtrip(x, spec)
    assert y.is_contiguous(memory_format=torch.channels_last)
    base = x.permute(0, 2, 3, 1)
    assert base.is_contiguous()
    assert torch.equal(y, dequantize(quantize(base, spec)).permute(0, 3, 1, 2))


def test_non_dense_view_keeps_its_strides():
    base = torch.randn(30, 50)
    x = base[:, ::3]
    spec = QuantSpec(bits=5, block=16)
    y = _roundtrip(x, spec)
    assert torch.equal(y, dequantize(quantize(x.contiguous(), spec)))


def test_float64_is_refused():
    # The codec computes in fp32: float64 would lose its range silently (1e-50 -> 0).
    x = torch.randn(300, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        quantize(x, QuantSpec(bits=8))


def test_requires_grad_input_is_detached():
    x = torch.randn(64, requires_grad=True)
    y = dequantize(quantize(x, QuantSpec()))
    assert not y.requires_grad


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(10),
        torch.arange(10, dtype=torch.int8),
        torch.ones(10, dtype=torch.bool),
        torch.randn(10, dtype=torch.complex64),
    ],
    ids=["int64", "int8", "bool", "complex"],
)
def test_non_float_input_raises_type_error(x):
    with pytest.raises(TypeError, match="floating"):
        quantize(x, QuantSpec())


def test_meta_tensor_raises_clear_error():
    with pytest.raises(ValueError, match="meta device"):
        quantize(torch.empty(10, device="meta"), QuantSpec())


def test_bad_arguments():
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize(torch.randn(4), {"bits": 4})
    with pytest.raises(TypeError, match="Tensor"):
        quantize([1.0, 2.0], QuantSpec())
    with pytest.raises(TypeError, match="Packed"):
        dequantize(torch.randn(3))
    with pytest.raises(ValueError, match="backend"):
        quantize(torch.randn(4), QuantSpec(), backend="cuda")


def test_large_tensor_uses_slabs_consistently():
    """Tensors bigger than one slab give the same bits as slab-sized pieces."""
    spec = QuantSpec(bits=3, block=64)
    x = torch.randn(3 * (1 << 18) + 100)
    p = quantize(x, spec)
    cut = 1 << 18  # a slab boundary, a multiple of the block
    head = quantize(x[:cut], spec)
    assert torch.equal(p.payload[: head.payload.numel()], head.payload)
    assert torch.equal(p.scales[: head.scales.numel()], head.scales)
    _assert_within_half_step(x, dequantize(p), p, spec)


@pytest.mark.parametrize(
    ("fmt", "bits"), [("int", 4), ("int", 5), ("fp4_e2m1", 4), ("fp8_e4m3", 8)]
)
def test_reference_compiles_fullgraph_to_the_same_bits(fmt, bits):
    """Under torch.compile (how compiled models run the codec) inductor must not change a bit."""
    from agoq.quant.codec import dequantize_flat_torch, quantize_flat_torch

    spec = QuantSpec(bits=bits, format=fmt, block=64)
    x = torch.randn(64 * 50 + 7, dtype=torch.bfloat16)
    x[3] = math.nan
    payload, scales = quantize_flat_torch(x, spec)
    fast_q = torch.compile(lambda f: quantize_flat_torch(f, spec), fullgraph=True)
    fast_dq = torch.compile(
        lambda p, s: dequantize_flat_torch(p, s, spec, x.numel(), x.dtype), fullgraph=True
    )
    p2, s2 = fast_q(x)
    assert torch.equal(p2, payload)
    assert torch.equal(s2.nan_to_num(-1), scales.nan_to_num(-1))
    y_ref = dequantize_flat_torch(payload, scales, spec, x.numel(), x.dtype)
    assert torch.equal(fast_dq(payload, scales).nan_to_num(-1), y_ref.nan_to_num(-1))
