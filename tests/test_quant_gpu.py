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
    from agoq.quant import codec, triton_kernels

    calls = []
    real = triton_kernels.quantize_flat
    monkeypatch.setattr(
        triton_kernels, "quantize_flat", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    quantize(torch.randn(1000, device="cuda"), QuantSpec())
    assert calls, "CUDA tensors must go through the fused kernels"
    assert codec._resolve(torch.device("cpu"), "auto") == "torch"


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
