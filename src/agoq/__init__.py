"""agoq: 4-bit activations and 8-bit gradients for PyTorch LLM training."""

from .activations import ActivationContext, ActivationPlan, KindRule, quantize_activations
from .gradients import (
    Int8AllReduceState,
    Int8GradStore,
    install_int8_reduce_scatter,
    int8_all_reduce,
    int8_allreduce,
)
from .guard import NumericsError, NumericsGuard
from .memory import MemoryReport
from .pipeline import quantize_stage
from .quant import Packed, QuantSpec, dequantize, quantize

__version__ = "0.1.0"


def __getattr__(name: str) -> type:
    # Int8ReduceScatter subclasses a private FSDP2 class: built at first access, so that
    # importing agoq imports no private torch module (agoq._compat).
    if name == "Int8ReduceScatter":
        from .gradients import fsdp

        return fsdp.Int8ReduceScatter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActivationContext",
    "ActivationPlan",
    "Int8AllReduceState",
    "Int8GradStore",
    "Int8ReduceScatter",
    "KindRule",
    "MemoryReport",
    "NumericsError",
    "NumericsGuard",
    "Packed",
    "QuantSpec",
    "__version__",
    "dequantize",
    "install_int8_reduce_scatter",
    "int8_all_reduce",
    "int8_allreduce",
    "quantize",
    "quantize_activations",
    "quantize_stage",
]
