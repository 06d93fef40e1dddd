"""Codec throughput (as a ratio to a same-size copy, measured in the same run) and error.

    python benchmarks/codec.py [--numel N] [--reps R] [--no-write]

For every format: the codec op's quantize and dequantize throughput in GB/s of the
full-precision tensor, divided by the throughput of ``dst.copy_(x)`` into a preallocated tensor
of the same size (the memory-bandwidth floor), with dequantize writing into a preallocated
tensor too; the allocating dequantize against ``x.clone()``. On CPU the fused C kernel runs
(and the eager reference is timed for contrast, with the inductor-compiled reference once);
on CUDA the fused Triton kernels. Then the relative RMS reconstruction error per format on
Gaussian and heavy-tailed (Student-t, 3 d.o.f.) data, and the effect of block size and scale
dtype, to choose the default activation format.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _report import machine, median_seconds, table, today, write_section
from agoq import QuantSpec, dequantize, quantize
from agoq.quant import codec, cpu_kernels, ops

SPECS = [("int", b) for b in (2, 3, 4, 5, 6, 8)] + [("fp4_e2m1", 4), ("fp8_e4m3", 8)]


def throughput(
    device: torch.device, dtype: torch.dtype, numel: int, reps: int
) -> tuple[list[list], dict[str, float]]:
    """Rows per format (the codec op's GB/s and ratios to the copies, and the reference's
    ratio for contrast) and the copies' GB/s."""
    x = torch.randn(1, numel, device=device).to(dtype)
    dst = torch.empty_like(x)
    gb = x.numel() * x.element_size() / 1e9
    rows = []
    base: dict[str, list[float]] = {"copy": [], "clone": []}
    for fmt, bits in SPECS:
        spec = QuantSpec(bits=bits, format=fmt, scale_dtype=torch.bfloat16)
        wire = ops.quantize_rows(x, spec)
        p, s = ops.split_wire(wire, spec, numel)
        fns = {
            "copy": lambda: dst.copy_(x),
            "clone": lambda: x.clone(),
            "quantize": lambda spec=spec: ops.quantize_rows(x, spec),
            "dequantize into": lambda p=p, s=s, spec=spec: ops.dequantize_rows(
                p, s, spec, numel, dtype, out=dst
            ),
            "dequantize": lambda p=p, s=s, spec=spec: ops.dequantize_rows(p, s, spec, numel, dtype),
        }
        if device.type == "cpu":  # the eager reference, what ran before the fused kernel
            fns["reference quantize"] = lambda spec=spec: quantize(x[0], spec, backend="torch")
        t = median_seconds(fns, device, reps=reps)
        base["copy"].append(t["copy"])
        base["clone"].append(t["clone"])
        q, dq = t["copy"] / t["quantize"], t["copy"] / t["dequantize into"]
        rows.append(
            [
                fmt,
                bits,
                f"{gb / t['quantize']:.1f}",
                f"**{q:.2f}x**",
                f"**{dq:.2f}x**",
                f"{t['clone'] / t['dequantize']:.2f}x",
                "yes" if min(q, dq) >= 0.5 else "**no**",
                f"{t['copy'] / t['reference quantize']:.2f}x" if "reference quantize" in t else "-",
            ]
        )
        print(device.type, dtype, fmt, bits, rows[-1][2:], flush=True)
    copies = {k: gb / statistics.median(v) for k, v in base.items()}
    return rows, copies


def inductor_attempt(numel: int, reps: int) -> list[str]:
    """The rejected route, measured: the reference compiled by inductor (int8, fp32)."""
    spec = QuantSpec(bits=8, format="int", scale_dtype=torch.bfloat16)
    x = torch.randn(numel // spec.block, spec.block)
    dst = torch.empty_like(x)

    def ref(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sc = codec.block_scales(xb, spec)
        return codec.encode_block_values(xb, sc, spec, None), sc.to(spec.scale_dtype)

    t0 = time.perf_counter()
    fn = torch.compile(ref, dynamic=True)
    fn(x)
    compile_s = time.perf_counter() - t0
    t = median_seconds({"copy": lambda: dst.copy_(x), "inductor": lambda: fn(x)}, x.device, reps)
    return [f"{compile_s:.1f} s", f"{t['copy'] / t['inductor']:.2f}x"]


def _data(kind: str, numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(numel, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        return z.float()
    chi2 = torch.randn(3, numel, generator=g, dtype=torch.float64).pow(2).sum(0)
    return (z / torch.sqrt(chi2 / 3)).float()  # Student-t, 3 degrees of freedom


def rel_rms(x: torch.Tensor, spec: QuantSpec) -> float:
    """RMS reconstruction error relative to the RMS of ``x``."""
    y = dequantize(quantize(x, spec))
    return (y.double() - x.double()).pow(2).mean().sqrt().item() / x.double().pow(
        2
    ).mean().sqrt().item()


def error_rows(numel: int) -> tuple[list[list], list[list]]:
    """(format table, block/scale-dtype table) of relative RMS errors."""
    data = {k: _data(k, numel) for k in ("gaussian", "student_t3")}
    by_format = []
    for fmt, bits in SPECS:
        spec = QuantSpec(bits=bits, format=fmt)
        g, t = (rel_rms(data[k], spec) for k in ("gaussian", "student_t3"))
        by_format.append([fmt, bits, f"{spec.bits_per_element:.3f}", f"{g:.4f}", f"{t:.4f}"])
    by_block = []
    for fmt in ("int", "fp4_e2m1"):
        for block in (32, 64, 128, 256):
            for sd in (torch.float32, torch.bfloat16):
                spec = QuantSpec(bits=4, format=fmt, block=block, scale_dtype=sd)
                g, t = (rel_rms(data[k], spec) for k in ("gaussian", "student_t3"))
                by_block.append(
                    [
                        fmt,
                        block,
                        str(sd).removeprefix("torch."),
                        f"{spec.bits_per_element:.3f}",
                        f"{g:.4f}",
                        f"{t:.4f}",
                    ]
                )
    return by_format, by_block


def main() -> None:
    """Run the codec benchmark and write its section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24, help="elements per timed tensor (CPU)")
    ap.add_argument(
        "--cuda-numel", type=int, default=1 << 28, help="elements per timed tensor (CUDA)"
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--error-numel", type=int, default=1 << 22)
    ap.add_argument("--skip-inductor", action="store_true", help="skip the inductor comparison")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    args = ap.parse_args()

    head = [
        "format",
        "bits",
        "quantize GB/s",
        "quantize / copy",
        "dequantize (into) / copy",
        "dequantize (allocating) / clone",
        ">= 0.5x copy",
        "reference quantize / copy",
    ]
    kernel = "fused C kernel" if cpu_kernels.unavailable_reason() == "" else (
        f"torch reference ({cpu_kernels.unavailable_reason()})"
    )
    parts = [
        f"Run {today()} on {machine()}. Command: `python benchmarks/codec.py`.\n",
        "The codec op (`torch.ops.agoq.quantize_blockwise` / `dequantize_blockwise`, what "
        f"activations, collectives and the gradient store call; on CPU: {kernel}; on CUDA: "
        "Triton), bf16 scales, block 128. GB/s are of the full-precision tensor. `copy` is "
        "`dst.copy_(x)` into a preallocated tensor of the same size and dtype, the bandwidth "
        "floor; `dequantize (into)` writes into a preallocated tensor too "
        "(`dequantize_rows(..., out=)`), so both sides move the same bytes without "
        "allocating. `dequantize (allocating)` returns a new tensor and is compared with "
        "`x.clone()`, which allocates the same way (on CPU a fresh large allocation is "
        "page-faulted in, which dominates both). The last column is the eager torch "
        "reference, the CPU path before the fused kernel. All timed in the same run, "
        "interleaved, median of the repetitions. Goal: >= 0.5x copy for quantize and "
        "dequantize.\n",
    ]
    runs = [(torch.device("cpu"), args.numel)]
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), args.cuda_numel))
    for device, numel in runs:
        for dtype in (torch.float32, torch.bfloat16):
            rows, copies = throughput(device, dtype, numel, args.reps)
            mib = numel * torch.empty((), dtype=dtype).element_size() / 2**20
            parts.append(
                f"**{device.type}, {str(dtype).removeprefix('torch.')} "
                f"({numel:,} elements = {mib:.0f} MiB, median of {args.reps}; "
                f"copy {copies['copy']:.1f} GB/s, clone {copies['clone']:.1f} GB/s):**\n\n"
                f"{table(head, rows)}\n"
            )
    if not args.skip_inductor:
        compile_s, ratio = inductor_attempt(args.numel, args.reps)
        parts.append(
            "**The route not taken: the reference compiled by inductor** (int8, fp32, "
            f"dynamic shapes): first call (compile) {compile_s}, then quantize / copy "
            f"{ratio}. Inductor emits the block-absmax reduction and the encode as two loops "
            "over the whole tensor (the scale is also an output), so the input is read from "
            "memory twice, and each format, dtype and shape class compiles for seconds in "
            "every process. That compile time landing inside timed calls (and recompiles "
            "when a new shape class arrives) is what made the first compiled attempt "
            "erratic. The C kernel does one pass per L1-resident block and builds once per "
            "machine in about a second.\n"
        )
    by_format, by_block = error_rows(args.error_numel)
    parts.append(
        f"**Relative RMS error** (RMS(x - x̂) / RMS(x), {args.error_numel:,} elements, "
        f"block 128, fp32 scales, nearest rounding):\n\n"
        + table(
            ["format", "bits", "bits/element incl. scale", "Gaussian", "Student-t (3 d.o.f.)"],
            by_format,
        )
        + "\n"
    )
    parts.append(
        "**4-bit: block size and scale dtype:**\n\n"
        + table(
            ["format", "block", "scale dtype", "bits/element", "Gaussian", "Student-t (3 d.o.f.)"],
            by_block,
        )
        + "\n"
    )
    four = [r for r in by_format if r[1] == 4]
    best = min(four, key=lambda r: float(r[4]))
    other = max(four, key=lambda r: float(r[4]))
    parts.append(
        f"Reading: at the same 4.25 bits/element, `{best[0]}` has "
        f"{float(best[3]) / float(other[3]):.2f}x the Gaussian error and "
        f"{float(best[4]) / float(other[4]):.2f}x the heavy-tailed error of `{other[0]}`; "
        "activations are heavy-tailed, so the 4-bit activation default is the lower of the "
        "two on Student-t data. bf16 scales cost no measurable error and save 1/8 bit per "
        "element at block 128.\n"
    )
    for r in by_format:
        print(*r)
    for r in by_block:
        print(*r)
    if not args.no_write:
        write_section("codec", "## Codec\n\n" + "\n".join(parts))
        print("wrote docs/benchmarks.md (section codec)")
    assert not math.isnan(float(by_format[0][3]))


if __name__ == "__main__":
    main()
