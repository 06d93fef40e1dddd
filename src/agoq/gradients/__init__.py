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
    install_int8_all_reduce_hook,
    install_int8_reduce_scatter,
    int8_all_reduce_hook,
)
from .storage import Int8GradStore


def __getattr__(name: str) -> type:
    # Int8ReduceScatter subclasses a private FSDP2 class: built at first access, so that
    # importing agoq imports no private torch module (agoq._compat).
    if name == "Int8ReduceScatter":
        from . import fsdp

        return fsdp.Int8ReduceScatter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
