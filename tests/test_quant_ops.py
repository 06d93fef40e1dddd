"""The codec op (torch.ops.agoq.quantize_blockwise / dequantize_blockwise).

Every kernel behind it (the fused C kernel on CPU, Triton on CUDA or under the interpreter)
must give the bits of the pure-torch reference (``quantize_flat_torch`` /
``dequantize_flat_torch``, applied row by row), NaN payloads aside: a NaN is a NaN. The
reference itself is checked against fp64 math in test_quant_codec.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from agoq.quant import QuantSpec, codec, cpu_kernels, ops

FORMATS = [("int", b) for b in (2, 3, 4, 5, 6, 8)] + [("fp4_e2m1", 4), ("fp8_e4m3", 8)]
IN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN equal to NaN (whatever its payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a.view(ints)[~na], b.view(ints)[~nb])


def _sample(rows: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-4, 4) if dtype == torch.float16 else (-30, 30)
    x = torch.randn(rows, n, generator=g) * torch.logspace(lo, hi, n)
    x = x[:, torch.randperm(n, generator=g)]
    if n > 400:
        x[0, 5] = math.nan
        x[-1, 17] = -math.inf
        x[rows // 2, 200:330] = 0.0  # whole zero blocks, one holding -0
        x[rows // 2, 300] = -0.0
        x[0, 390] = -0.0
        x[-1, 333] = 1e-41 if dtype != torch.float16 else 1e-7  # subnormal
    return x.to(dtype)


needs_kernel = pytest.mark.skipif(
    not cpu_kernels.supports(QuantSpec(), torch.float32),
    reason=f"fused CPU kernel unavailable: {cpu_kernels.unavailable_reason()}",
)


@needs_kernel
@pytest.mark.parametrize("fmt,bits", FORMATS)
@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("block,scale_dtype", [(16, torch.float32), (128, torch.bfloat16)])
def test_cpu_kernel_bits_equal_reference(fmt, bits, dtype, block, scale_dtype):
    spec = QuantSpec(bits=bits, format=fmt, block=block, scale_dtype=scale_dtype)
    n = 1000 + block // 2  # every row ends in a partial block
    x = _sample(3, n, dtype)
    wire = torch.ops.agoq.quantize_blockwise(
        x, bits, fmt, block, scale_dtype == torch.bfloat16, None
    )
    payload, scales = ops.split_wire(wire, spec, n)
    for r in range(x.shape[0]):
        ref_p, ref_s = codec.quantize_flat_torch(x[r], spec)
        assert torch.equal(payload[r], ref_p), f"row {r} payload"
        assert _same(scales[r], ref_s), f"row {r} scales"
    for out_dtype in IN_DTYPES:
        got = ops.dequantize_rows(payload, scales, spec, n, out_dtype)
        for r in range(x.shape[0]):
            ref = codec.dequantize_flat_torch(
                payload[r].contiguous(), scales[r].contiguous(), spec, n, out_dtype
            )
            assert _same(got[r], ref), f"row {r} dequantized to {out_dtype}"


@needs_kernel
def test_cpu_kernel_large_tensor_multithreaded_bits():
    """Above the parallel threshold the OpenMP split must not change a bit."""
    spec = QuantSpec(bits=4, format="fp4_e2m1", block=128, scale_dtype=torch.bfloat16)
    x = _sample(1, 1 << 18, torch.bfloat16, seed=3)
    got = codec.quantize(x[0], spec)
    ref_p, ref_s = codec.quantize_flat_torch(x[0], spec)
    assert torch.equal(got.payload, ref_p) and _same(got.scales, ref_s)
    assert _same(
        codec.dequantize(got), codec.dequantize_flat_torch(ref_p, ref_s, spec, x.numel(), x.dtype)
    )


@needs_kernel
def test_cpu_kernel_stochastic_int_uses_the_given_noise():
    spec = QuantSpec(bits=8, format="int", block=64, rounding="stochastic")
    x = _sample(2, 700, torch.float32)
    noise = ops.make_noise((2, 700), spec, torch.Generator().manual_seed(1), x.device)
    got = torch.ops.agoq.quantize_blockwise(x, 8, "int", 64, False, noise)
    ref = ops._reference_quantize(x, spec, noise)
    p, s = ops.split_wire(got, spec, 700)
    rp, rs = ops.split_wire(ref, spec, 700)
    assert torch.equal(p, rp) and _same(s, rs)


def test_wire_rows_are_payload_then_scales():
    """One wire row = the row's codec payload then its scales: a run of rows is one buffer."""
    spec = QuantSpec(bits=8, format="int", block=128, scale_dtype=torch.bfloat16)
    x = torch.randn(4, 512)
    wire = ops.quantize_rows(x, spec)
    lay = ops.row_layout(spec, 512)
    assert wire.shape == (4, lay.row_bytes) == (4, 512 + 4 * 2)
    for r in range(4):
        p, s = codec.quantize_flat_torch(x[r], spec)
        assert torch.equal(wire[r, :512], p)
        assert torch.equal(wire[r, 512:].view(torch.bfloat16), s)
    # A received copy of rows 2..3 dequantizes on its own.
    part = wire[2:].clone()
    back = ops.dequantize_rows(*ops.split_wire(part, spec, 512), spec, 512)
    assert _same(back, ops.dequantize_rows(*ops.split_wire(wire, spec, 512), spec, 512)[2:])


@pytest.mark.parametrize("fmt,bits", [("int", 8), ("fp4_e2m1", 4)])
def test_op_passes_opcheck(fmt, bits):
    """Schema, fake kernel and real kernel agree (torch.library.opcheck)."""
    x = torch.randn(3, 300)
    torch.library.opcheck(torch.ops.agoq.quantize_blockwise, (x, bits, fmt, 32, True, None))
    spec = QuantSpec(bits=bits, format=fmt, block=32, scale_dtype=torch.bfloat16)
    p, s = ops.split_wire(ops.quantize_rows(x, spec), spec, 300)
    torch.library.opcheck(
        torch.ops.agoq.dequantize_blockwise, (p, s, bits, fmt, 32, 300, torch.bfloat16)
    )


def test_op_compiles_without_graph_breaks():
    spec = QuantSpec(bits=4, format="int", block=64)

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        wire = ops.quantize_rows(x, spec)
        return ops.dequantize_rows(*ops.split_wire(wire, spec, x.shape[1]), spec, x.shape[1])

    x = torch.randn(5, 1000)
    compiled = torch.compile(roundtrip, fullgraph=True, dynamic=True)
    assert _same(compiled(x), roundtrip(x))
    y = torch.randn(3, 777)  # another shape: no recompile-dependent result
    assert _same(compiled(y), roundtrip(y))


def test_split_wire_rejects_a_foreign_buffer():
    spec = QuantSpec(bits=8, format="int", block=128)
    with pytest.raises(ValueError, match="split_wire"):
        ops.split_wire(torch.zeros(2, 100, dtype=torch.uint8), spec, 512)


def test_kernel_unavailable_falls_back_to_reference(monkeypatch):
    """Without a compiler (supports() False) the op runs the reference: same bits."""
    spec = QuantSpec(bits=4, format="fp4_e2m1", block=32)
    x = _sample(2, 600, torch.float32)
    fast = ops.quantize_rows(x, spec)
    monkeypatch.setattr(cpu_kernels, "supports", lambda spec, dtype: False)
    slow = ops.quantize_rows(x, spec)
    pf, sf = ops.split_wire(fast, spec, 600)
    ps, ss = ops.split_wire(slow, spec, 600)
    assert torch.equal(pf, ps) and _same(sf, ss)


@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_dequantize_into_a_preallocated_buffer(dtype):
    spec = QuantSpec(bits=4, format="fp4_e2m1", block=32, scale_dtype=torch.bfloat16)
    x = _sample(2, 500, torch.float32)
    p, s = ops.split_wire(ops.quantize_rows(x, spec), spec, 500)
    out = torch.full((2, 500), 7.0, dtype=dtype)
    assert ops.dequantize_rows(p, s, spec, 500, out=out) is out
    assert _same(out, ops.dequantize_rows(p, s, spec, 500, dtype))
    with pytest.raises(ValueError, match="out must be"):
        ops.dequantize_rows(p, s, spec, 500, out=torch.empty(2, 499))
    with pytest.raises(ValueError, match="out must be"):
        ops.dequantize_rows(p, s, spec, 500, out=torch.empty(500, 2).t())


@needs_kernel
def test_fp4_rounding_ties_go_to_even_like_the_reference():
    """Values exactly on the E2M1 midpoints (scale 1): the fused kernel's threshold encode
    and the reference's bit arithmetic must pick the same (even) code."""
    spec = QuantSpec(bits=4, format="fp4_e2m1", block=16)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    x = torch.tensor([ties + [-t for t in ties]], dtype=torch.float32)
    wire = ops.quantize_rows(x, spec)
    ref = ops._reference_quantize(x, spec, None)
    assert torch.equal(wire, ref)
    back = ops.dequantize_rows(*ops.split_wire(wire, spec, 16), spec, 16)[0]
    assert back[:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_without_a_compiler_the_reference_runs_with_a_warning(tmp_path):
    """A machine with no C compiler gets one clear warning and the reference's results."""
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from agoq.quant import QuantSpec, codec, cpu_kernels\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(3000)\n"
        "    p = codec.quantize(x, QuantSpec())\n"
        "ref = codec.quantize_flat_torch(x, QuantSpec())\n"
        "assert torch.equal(p.payload, ref[0]) and torch.equal(p.scales, ref[1])\n"
        "assert not cpu_kernels.supports(QuantSpec(), torch.float32)\n"
        "msgs = [str(m.message) for m in w if 'fused CPU codec kernel' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    env = {
        **__import__("os").environ,
        "CC": str(tmp_path / "no-such-cc"),
        "AGOQ_CACHE_DIR": str(tmp_path),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no-such-cc" in out.stdout or "failed" in out.stdout or "No such file" in out.stdout


def test_the_public_ops_refuse_what_their_kernels_would_misread():
    """torch.ops.agoq.* index raw memory: wrong shapes, dtypes or noise are clear errors
    (before: an int tensor was quantized as floats, a short payload read past its end)."""
    spec = QuantSpec(bits=8, format="int", block=32, scale_dtype=torch.bfloat16)
    q = torch.ops.agoq.quantize_blockwise
    with pytest.raises(TypeError, match="float"):
        q(torch.arange(64).view(1, 64), 8, "int", 32, True, None)
    with pytest.raises(ValueError, match="2-D"):
        q(torch.randn(64), 8, "int", 32, True, None)
    with pytest.raises(ValueError, match="noise"):
        q(torch.randn(2, 64), 8, "int", 32, True, torch.rand(2, 10))
    p, s = ops.split_wire(ops.quantize_rows(torch.randn(2, 64), spec), spec, 64)
    d = torch.ops.agoq.dequantize_blockwise
    with pytest.raises(ValueError, match="payload"):
        d(p[:, :10].contiguous(), s, 8, "int", 32, 64, torch.float32)
    with pytest.raises(ValueError, match="scales"):
        d(p, s[:, :1].contiguous(), 8, "int", 32, 64, torch.float32)
    with pytest.raises(ValueError, match="payload"):
        d(p, s, 8, "int", 32, 1000, torch.float32)  # claims more elements than stored
