"""agoq: 4-bit activations and 8-bit gradients for PyTorch LLM training."""

from .activations import ActivationContext, ActivationPlan, KindRule, quantize_activations
from .memory import MemoryReport
from .quant import Packed, QuantSpec, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "ActivationContext",
    "ActivationPlan",
    "KindRule",
    "MemoryReport",
    "Packed",
    "QuantSpec",
    "__version__",
    "dequantize",
    "quantize",
    "quantize_activations",
]
