"""Placeholder: the fused CPU kernel lands next; until then the reference runs."""

from __future__ import annotations

import torch

from .spec import QuantSpec


def supports(spec: QuantSpec, dtype: torch.dtype) -> bool:
    """True when the fused CPU kernel handles ``spec`` and ``dtype``."""
    return False
