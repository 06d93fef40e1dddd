"""agoq: 4-bit activations and 8-bit gradients for PyTorch LLM training."""

from .quant import Packed, QuantSpec, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["Packed", "QuantSpec", "__version__", "dequantize", "quantize"]
