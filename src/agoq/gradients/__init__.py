"""Gradient quantization: the int8 all-reduce, DDP/FSDP2 integrations, 8-bit storage."""

from .allreduce import (
    DEFAULT_SPEC,
    int8_all_reduce,
    int8_all_reduce_functional,
    reference_all_reduce,
    wire_bytes,
)
from .ddp import Int8AllReduceState, int8_allreduce
from .fsdp import (
    Int8ReduceScatter,
    install_int8_all_reduce_hook,
    install_int8_reduce_scatter,
    int8_all_reduce_hook,
)
from .storage import Int8GradStore

__all__ = [
    "DEFAULT_SPEC",
    "Int8AllReduceState",
    "Int8GradStore",
    "Int8ReduceScatter",
    "install_int8_all_reduce_hook",
    "install_int8_reduce_scatter",
    "int8_all_reduce",
    "int8_all_reduce_functional",
    "int8_all_reduce_hook",
    "int8_allreduce",
    "reference_all_reduce",
    "wire_bytes",
]
