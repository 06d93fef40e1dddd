"""Activation quantization: plans, the saved-tensor context and recompute."""

from .context import ActivationContext, quantize_activations
from .plan import KINDS, ActivationPlan, KindRule

__all__ = ["KINDS", "ActivationContext", "ActivationPlan", "KindRule", "quantize_activations"]
