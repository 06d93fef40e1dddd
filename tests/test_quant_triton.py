"""The fused Triton kernels reproduce the reference layout bit for bit.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py
before the kernels are defined), on small inputs because the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agoq import QuantSpec, dequantize, quantize
from quant_reference import ALL_SPECS, local_gap, scales_per_element

pytest.importorskip("triton")
from agoq.quant import triton_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_kernels.available(DEVICE),
    reason=f"Triton backend unavailable: {triton_kernels.unavailable_reason(DEVICE)}",
)


def _sample(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.logspace(-4, 4, numel).pow(0.5)
    if numel > 40:
        x[7] = math.nan
        x[33] = -math.inf
        x[40:60] = 0.0
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that treats NaN as equal to NaN."""
    a, b = a.cpu().reshape(-1), b.cpu().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) or (
        a.shape == b.shape
        and torch.equal(torch.isnan(a.float()), torch.isnan(b.float()))
        and torch.equal(a.float().nan_to_num(0.0), b.float().nan_to_num(0.0))
    )


@pytest.mark.parametrize(("fmt", "bits"), ALL_SPECS)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_bit_for_bit(fmt, bits, scale_dtype, dtype):
    spec = QuantSpec(bits=bits, format=fmt, block=64, scale_dtype=scale_dtype)
    x = _sample(64 * 37 + 19, seed=bits).to(dtype).to(DEVICE)
    ref = quantize(x, spec, backend="torch")
    tri = quantize(x, spec, backend="triton")
    assert torch.equal(tri.payload, ref.payload)
    assert _same(tri.scales, ref.scales)
    y_ref = dequantize(ref, backend="torch")
    y_tri = dequantize(ref, backend="triton")
    assert y_tri.dtype == dtype and y_tri.stride() == x.stride()
    assert _same(y_tri, y_ref)


@settings(max_examples=25, deadline=None)
@given(
    spec_i=st.integers(0, len(ALL_SPECS) - 1),
    block=st.sampled_from([16, 128, 1024]),
    shape=st.lists(st.integers(1, 50), min_size=0, max_size=3),
    exponent=st.integers(-100, 100),
    seed=st.integers(0, 1000),
)
def test_triton_matches_reference_random_shapes(spec_i, block, shape, exponent, seed):
    fmt, bits = ALL_SPECS[spec_i]
    spec = QuantSpec(bits=bits, format=fmt, block=block)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0**exponent).to(DEVICE)
    ref = quantize(x, spec, backend="torch")
    tri = quantize(x, spec, backend="triton")
    assert torch.equal(tri.payload, ref.payload)
    assert _same(tri.scales, ref.scales)
    assert _same(dequantize(tri, backend="triton"), dequantize(ref, backend="torch"))


def test_triton_empty_and_transposed():
    spec = QuantSpec(bits=4, block=16)
    e = quantize(torch.empty(0, 3, device=DEVICE), spec, backend="triton")
    assert e.nbytes == 0 and dequantize(e, backend="triton").shape == (0, 3)
    base = torch.randn(24, 40, device=DEVICE)
    y = dequantize(quantize(base.t(), spec, backend="triton"), backend="triton")
    assert y.stride() == base.t().stride()
    assert torch.equal(y, dequantize(quantize(base, spec, backend="torch")).t())


def test_triton_stochastic_reproducible_and_unbiased():
    spec = QuantSpec(bits=4, block=64, rounding="stochastic")
    x = torch.randn(256, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    a = quantize(x, spec, backend="triton", generator=torch.Generator().manual_seed(9))
    b = quantize(x, spec, backend="triton", generator=torch.Generator().manual_seed(9))
    c = quantize(x, spec, backend="triton", generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.payload, b.payload) and not torch.equal(a.payload, c.payload)
    gen = torch.Generator().manual_seed(77)
    draws = 400
    total = torch.zeros(256, dtype=torch.float64)
    for _ in range(draws):
        p = quantize(x, spec, backend="triton", generator=gen)
        total += (dequantize(p, backend="triton") - x).double().cpu()
    s = scales_per_element(p.scales.cpu(), 64, 256)
    gap = local_gap(spec, x.double().cpu() / s) * s
    assert torch.all((total / draws).abs() <= 5 * gap / (2 * math.sqrt(draws)) + 1e-12)


def test_backend_triton_refuses_unsupported_device():
    if DEVICE.type == "cuda":
        pytest.skip("needs a device Triton cannot run on")
    assert triton_kernels.available(torch.device("cpu"))  # interpreter on
    assert not triton_kernels.available(torch.device("meta"))


@pytest.mark.parametrize("fmt,bits", [("int", 8), ("int", 3), ("fp4_e2m1", 4), ("fp8_e4m3", 8)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_triton_wire_rows_equal_reference(fmt, bits, stochastic):
    """The op's row layout (payload then scales per row, row-strided views) from Triton
    equals the reference; with the op's noise, stochastic rounding does too."""
    from agoq.quant import ops

    rounding = "stochastic" if stochastic else "nearest"
    spec = QuantSpec(bits=bits, format=fmt, block=32, scale_dtype=torch.bfloat16, rounding=rounding)
    x = torch.stack([_sample(1001, s) for s in range(3)]).to(DEVICE)
    x[1, 310] = -0.0
    noise = ops.make_noise((3, 1001), spec, None, DEVICE) if stochastic else None
    wire = triton_kernels.quantize_rows(x, spec, noise)
    ref = ops._reference_quantize(x, spec, noise)
    (p, s), (rp, rs) = ops.split_wire(wire, spec, 1001), ops.split_wire(ref, spec, 1001)
    assert torch.equal(p, rp) and _same(s, rs)
    for dtype in (torch.float32, torch.bfloat16):
        got = torch.empty(3, 1001, dtype=dtype, device=DEVICE)
        triton_kernels.dequantize_rows(rp, rs, spec, 1001, got)
        assert _same(got, ops._reference_dequantize(rp, rs, spec, 1001, dtype))
