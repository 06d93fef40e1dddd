"""CUDA-only checks: automatic kernel choice and CUDA kernels against the CPU reference."""

from __future__ import annotations

import pytest
import torch

from agoq import QuantSpec, dequantize, quantize
from quant_reference import ALL_SPECS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_backend_uses_triton_on_cuda(monkeypatch):
    pytest.importorskip("triton")
    from agoq.quant import triton_kernels

    calls = []
    real = triton_kernels.quantize_rows
    monkeypatch.setattr(
        triton_kernels, "quantize_rows", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    quantize(torch.randn(1000, device="cuda"), QuantSpec())
    assert calls, "CUDA tensors must go through the fused kernels"


def test_op_on_cuda_never_syncs_the_host():
    """quantize_rows / dequantize_rows (and the stochastic noise) queue work only."""
    pytest.importorskip("triton")
    from agoq.quant import ops

    x = torch.randn(8, 1 << 16, device="cuda")
    for rounding in ("nearest", "stochastic"):
        spec = QuantSpec(bits=8, format="int", block=128, rounding=rounding)
        ops.quantize_rows(x, spec)  # warm up (Triton compiles on first use)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            wire = ops.quantize_rows(x, spec)
            p, s = ops.split_wire(wire, spec, x.shape[1])
            ops.dequantize_rows(p, s, spec, x.shape[1], out=torch.empty_like(x))
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_op_compiles_on_cuda_with_the_reference_bits():
    pytest.importorskip("triton")
    from agoq.quant import ops

    spec = QuantSpec(bits=4, format="fp4_e2m1", block=32, scale_dtype=torch.bfloat16)

    def roundtrip(x):
        wire = ops.quantize_rows(x, spec)
        return ops.dequantize_rows(*ops.split_wire(wire, spec, x.shape[1]), spec, x.shape[1])

    x = torch.randn(4, 1000)
    got = torch.compile(roundtrip, fullgraph=True)(x.cuda()).cpu()
    assert torch.equal(
        got.nan_to_num(-1),
        ops._reference_dequantize(
            *ops.split_wire(ops._reference_quantize(x, spec, None), spec, 1000),
            spec,
            1000,
            torch.float32,
        ).nan_to_num(-1),
    )


@pytest.mark.parametrize(("fmt", "bits"), ALL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_cpu_reference(fmt, bits, dtype):
    pytest.importorskip("triton")
    spec = QuantSpec(bits=bits, format=fmt, block=128)
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(1 << 20, generator=g) * torch.rand(1 << 20, generator=g) * 30).to(dtype)
    x[5] = float("nan")
    cpu = quantize(x, spec, backend="torch")
    gpu = quantize(x.cuda(), spec)
    assert torch.equal(gpu.payload.cpu(), cpu.payload)
    assert torch.equal(gpu.scales.cpu().nan_to_num(-1), cpu.scales.nan_to_num(-1))
    y_gpu = dequantize(gpu).cpu()
    y_cpu = dequantize(cpu)
    assert torch.equal(y_gpu.nan_to_num(-1), y_cpu.nan_to_num(-1))
