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


# The stack subset (``python -m pytest -m stack``): the test files that depend most on
# torch's version or on torchtitan 0.3, run by CI in its second environment (torch 2.14.1).
# The FSDP2 int8 reduce-scatter, TP/DTensor activations, the module hooks and the replay
# run there inside the torchtitan 0.3 tests; their own files run on torch 2.13 only, for
# time (the whole suite on 2.14.1 was run by hand: docs/limitations.md).
STACK = frozenset(
    {
        "test_compat.py",
        "test_torchtitan_v03.py",
        "test_activations_compile.py",
        "test_quant_ops.py",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in STACK:
            item.add_marker("stack")
