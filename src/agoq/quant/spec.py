"""QuantSpec: what a tensor is quantized to, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .._validate import ConfigTypeError, describe

Format = Literal["int", "fp4_e2m1", "fp8_e4m3"]
Rounding = Literal["nearest", "stochastic"]

INT_BITS = (2, 3, 4, 5, 6, 8)
FORMAT_BITS: dict[str, tuple[int, ...]] = {
    "int": INT_BITS,
    "fp4_e2m1": (4,),
    "fp8_e4m3": (8,),
}
SCALE_DTYPES = (torch.float32, torch.bfloat16)
MIN_BLOCK, MAX_BLOCK = 16, 4096


@dataclass(frozen=True)
class Minifloat:
    """A sign-magnitude float grid: `mbits` mantissa bits, smallest normal exponent `emin`."""

    ebits: int
    mbits: int
    emin: int
    max_value: float


# OCP E2M1 (no inf/nan) and E4M3FN (one NaN code, max 448): the codes we emit are the
# standard bit patterns of these formats.
MINIFLOATS: dict[str, Minifloat] = {
    "fp4_e2m1": Minifloat(ebits=2, mbits=1, emin=0, max_value=6.0),
    "fp8_e4m3": Minifloat(ebits=4, mbits=3, emin=-6, max_value=448.0),
}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a floating tensor.

    Elements are flattened (in memory order), split into blocks of ``block`` elements and
    each block is scaled by its absolute maximum. ``format="int"`` is symmetric integer
    quantization with levels ``-(2**(bits-1)-1) .. 2**(bits-1)-1``; ``"fp4_e2m1"`` and
    ``"fp8_e4m3"`` map the scaled block onto the OCP E2M1 / E4M3 grids. ``rounding`` is
    ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased, seeded by a generator).
    """

    bits: int = 4
    format: Format = "int"
    block: int = 128
    rounding: Rounding = "nearest"
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.format, str):
            raise ConfigTypeError(
                f"QuantSpec.format: expected a string, got {describe(self.format)}"
            )
        if self.format not in FORMAT_BITS:
            raise ValueError(
                f"QuantSpec.format must be one of {sorted(FORMAT_BITS)}, got {self.format!r}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigTypeError(f"QuantSpec.bits must be an int, got {describe(self.bits)}")
        allowed = FORMAT_BITS[self.format]
        if self.bits not in allowed:
            raise ValueError(
                f"QuantSpec.bits={self.bits} is not valid for format {self.format!r}; "
                f"allowed: {list(allowed)}"
            )
        if isinstance(self.block, bool) or not isinstance(self.block, int):
            raise ConfigTypeError(f"QuantSpec.block must be an int, got {describe(self.block)}")
        if not MIN_BLOCK <= self.block <= MAX_BLOCK or self.block & (self.block - 1):
            raise ValueError(
                f"QuantSpec.block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], "
                f"got {self.block!r}"
            )
        if not isinstance(self.rounding, str):
            raise ConfigTypeError(
                f"QuantSpec.rounding: expected a string, got {describe(self.rounding)}"
            )
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"QuantSpec.rounding must be 'nearest' or 'stochastic', got {self.rounding!r}"
            )
        if not isinstance(self.scale_dtype, torch.dtype):
            raise ConfigTypeError(
                f"QuantSpec.scale_dtype must be torch.float32 or torch.bfloat16, "
                f"got {describe(self.scale_dtype)}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype must be torch.float32 or torch.bfloat16, "
                f"got {self.scale_dtype!r}"
            )

    @property
    def max_level(self) -> float:
        """Largest magnitude of the code grid; the block absmax maps onto it."""
        if self.format == "int":
            return float(2 ** (self.bits - 1) - 1)
        return MINIFLOATS[self.format].max_value

    @property
    def bits_per_element(self) -> float:
        """Storage cost per element including the block scale."""
        scale_bits = 8 * torch.empty((), dtype=self.scale_dtype).element_size()
        return self.bits + scale_bits / self.block

    def payload_nbytes(self, numel: int) -> int:
        """Exact payload bytes for ``numel`` elements (padded to whole blocks)."""
        padded = -(-numel // self.block) * self.block
        return -(-padded * self.bits // 8)

    def nbytes(self, numel: int) -> int:
        """Exact bytes (payload + scales) a tensor of ``numel`` elements is stored in."""
        nblocks = -(-numel // self.block)
        scale_size = torch.empty((), dtype=self.scale_dtype).element_size()
        return self.payload_nbytes(numel) + nblocks * scale_size
