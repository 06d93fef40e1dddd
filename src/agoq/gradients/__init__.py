"""Gradient quantization: the int8 all-reduce, DDP/FSDP2 integrations, 8-bit storage."""

from .allreduce import (
    DEFAULT_SPEC,
    int8_all_reduce,
    int8_all_reduce_functional,
    reference_all_reduce,
    wire_bytes,
)
from .ddp import Int8AllReduceState, int8_allreduce

__all__ = [
    "DEFAULT_SPEC",
    "Int8AllReduceState",
    "int8_all_reduce",
    "int8_all_reduce_functional",
    "int8_allreduce",
    "reference_all_reduce",
    "wire_bytes",
]
