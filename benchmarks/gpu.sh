#!/usr/bin/env bash
# One-GPU check, ready to run as it is on a CUDA machine with agoq installed as the README
# says (pip install -e ".[dev,triton]"): the CUDA tests, then the codec, activation and
# all-reduce figures (benchmarks/gpu.py writes the "GPU" section of docs/benchmarks.md).
# Budget: under 8 minutes on one H200 (each step has its own timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
start=$SECONDS
# CUDA tests: everything marked gpu, and the codec op / Triton suites (which run on CUDA when
# a device is present).
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests || echo "GPU TESTS FAILED"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_quant_triton.py tests/test_quant_ops.py \
    || echo "CODEC TESTS FAILED"
echo "tests: $((SECONDS - start)) s"
# Benchmarks (codec, activations at dim 1024/2048 eager + compiled, all-reduce device side).
(cd benchmarks && timeout 240 python gpu.py --device cuda) || echo "GPU BENCHMARK FAILED"
echo "total: $((SECONDS - start)) s"
