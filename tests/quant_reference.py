"""Independent references for the codec tests: code grids built without agoq's code."""

from __future__ import annotations

import torch

from agoq import QuantSpec

E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

ALL_SPECS = [("int", b) for b in (2, 3, 4, 5, 6, 8)] + [("fp4_e2m1", 4), ("fp8_e4m3", 8)]


def grid(spec: QuantSpec) -> torch.Tensor:
    """Sorted float64 values the format can represent (before scaling)."""
    if spec.format == "int":
        qmax = 2 ** (spec.bits - 1) - 1
        return torch.arange(-qmax, qmax + 1, dtype=torch.float64)
    if spec.format == "fp4_e2m1":
        mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    else:
        every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        mags = every.to(torch.float64)
        mags = mags[torch.isfinite(mags) & (mags >= 0)]
    return torch.unique(torch.cat([mags, -mags]))


def local_gap(spec: QuantSpec, v: torch.Tensor) -> torch.Tensor:
    """Width of the grid interval holding each scaled value ``v`` (float64)."""
    g = grid(spec)
    hi = torch.searchsorted(g, v).clamp(1, len(g) - 1)
    return g[hi] - g[hi - 1]


def output_tolerance(y: torch.Tensor) -> torch.Tensor:
    """Rounding of the dequantized fp32 value into the output dtype (half an ulp)."""
    rel = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(
        y.dtype, 2.0**-24
    )
    # Half the smallest subnormal of the output dtype (absolute rounding floor).
    tiny = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}.get(y.dtype, 2.0**-150)
    tiny += 2.0**-149  # the fp32 product code * scale, when it is itself subnormal
    return y.double().abs() * rel + tiny


def scales_per_element(scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """The scale of each element's block, in flat order."""
    return scales.double().repeat_interleave(block)[:n]


def pack_bits_python(codes: list[int], bits: int, block: int) -> bytes:
    """The documented layout, bit by bit: per block, bit planes of width 8/4/2/1 (low bits
    first; 3 = 2+1, 5 = 4+1, 6 = 4+2); in a plane of width w, byte j holds codes
    j, j + block/k, ... (k = 8/w) at bit offsets 0, w, ..."""
    planes = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}[bits]
    out = bytearray()
    for b0 in range(0, len(codes), block):
        blk = codes[b0 : b0 + block]
        shift = 0
        for w in planes:
            k = 8 // w
            for j in range(block // k):
                byte = 0
                for i in range(k):
                    part = (blk[i * (block // k) + j] >> shift) & ((1 << w) - 1)
                    byte |= part << (i * w)
                out.append(byte)
            shift += w
    return bytes(out)
