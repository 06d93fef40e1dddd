"""The low-bit codec: QuantSpec, quantize, dequantize (torch reference + Triton kernels)."""

from .codec import Packed, code_values, dequantize, quantize
from .spec import QuantSpec

__all__ = ["Packed", "QuantSpec", "code_values", "dequantize", "quantize"]
