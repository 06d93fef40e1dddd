"""Test-wide setup.

Triton reads TRITON_INTERPRET when its kernels are decorated, i.e. at the first import of
agoq.quant.triton_kernels, so it is set here before any test module can import it. With a
GPU the real kernels run instead (tests/test_quant_gpu.py).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
