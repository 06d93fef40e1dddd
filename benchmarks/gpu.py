"""One-GPU figures: the codec op, the activation step overhead and the int8 all-reduce's
device-side cost, each side by side with its baseline in the same run.

    python benchmarks/gpu.py [--device cuda] [--quick] [--no-write]

Run by ``benchmarks/gpu.sh`` (with the CUDA tests). ``--device cpu --quick`` is a smoke run
on a machine without a GPU (it writes nothing).

1. Codec op (Triton on CUDA): quantize and dequantize-into GB/s vs ``dst.copy_(x)`` of the
   same size, int8 / fp4 / fp8, fp32 and bf16 inputs.
2. Activations: forward + backward of the reference LLaMA (bf16) at dim 1024 and 2048, eager
   and ``torch.compile``, the paper plan vs no agoq; saved bytes from agoq's own count and a
   pass-through hook.
3. The int8 all-reduce on one device: the codec work a rank does per 64 MB fp32 bucket
   (quantize W chunks, dequantize + divide + fp32 sum of the received chunks, requantize,
   dequantize the gathered result; W = 8), timed against a same-size copy, and the link
   bandwidth below which int8 saves time (bytes saved per second of codec work).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _report import machine, median_seconds, table, today, write_section
from agoq import ActivationPlan, QuantSpec, quantize_activations
from agoq.data import VOCAB_SIZE
from agoq.gradients.allreduce import DEFAULT_SPEC, wire_bytes
from agoq.models.llama import LlamaConfig, build
from agoq.quant import ops

FORMATS = [("int", 8), ("fp4_e2m1", 4), ("fp8_e4m3", 8)]


def codec_rows(device: torch.device, numel: int, reps: int) -> list[list]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, numel, device=device).to(dtype)
        dst = torch.empty_like(x)
        gb = x.numel() * x.element_size() / 1e9
        for fmt, bits in FORMATS:
            spec = QuantSpec(bits=bits, format=fmt, scale_dtype=torch.bfloat16)
            p, s = ops.split_wire(ops.quantize_rows(x, spec), spec, numel)
            t = median_seconds(
                {
                    "copy": lambda x=x, dst=dst: dst.copy_(x),
                    "q": lambda x=x, spec=spec: ops.quantize_rows(x, spec),
                    "dq": lambda p=p, s=s, spec=spec, dt=dtype, dst=dst: ops.dequantize_rows(
                        p, s, spec, numel, dt, out=dst
                    ),
                },
                device,
                reps=reps,
            )
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    f"{fmt}{bits if fmt == 'int' else ''}",
                    f"{gb / t['copy']:.1f}",
                    f"{gb / t['q']:.1f}",
                    f"**{t['copy'] / t['q']:.2f}x**",
                    f"**{t['copy'] / t['dq']:.2f}x**",
                ]
            )
            print("codec", rows[-1], flush=True)
    return rows


class _Bytes:
    """Bytes of distinct tensors autograd saves (a pass-through hook, independent of agoq)."""

    def __init__(self) -> None:
        self.total, self.seen = 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter) and id(base) not in self.seen:
            self.seen.add(id(base))
            self.total += base.numel() * base.element_size()
        return t


def activation_rows(device: torch.device, dims: list[int], batch: int, seq: int, reps: int):
    rows = []
    for dim in dims:
        cfg = LlamaConfig(
            dim=dim,
            n_layers=4,
            n_heads=max(1, dim // 128),
            vocab_size=VOCAB_SIZE,
            hidden_dim=4 * dim,
            max_seq_len=seq,
        )
        model = build(cfg).to(device=device, dtype=torch.bfloat16)
        tokens = torch.randint(0, VOCAB_SIZE, (batch, seq + 1), device=device)
        plan = ActivationPlan.agoq()

        def step(m, use_agoq: bool, tokens=tokens, plan=plan) -> None:
            def run():
                logits = m(tokens[:, :-1])
                F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

            if use_agoq:
                with quantize_activations(plan):
                    run()
            else:
                run()

        for mode in ("eager", "compiled"):
            m = model if mode == "eager" else torch.compile(model)
            t = median_seconds(
                {"baseline": lambda m=m: step(m, False), "agoq": lambda m=m: step(m, True)},
                device,
                reps=reps,
                warmup=3,
            )
            saved = _Bytes()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                logits = model(tokens[:, :-1])
            del logits
            with quantize_activations(plan) as ctx:
                logits = model(tokens[:, :-1])
            del logits
            mem = f"{ctx.report.stored_bytes / saved.total:.2f}x"
            rows.append(
                [
                    dim,
                    mode,
                    f"{t['baseline'] * 1e3:.1f}",
                    f"{t['agoq'] * 1e3:.1f}",
                    f"**{t['agoq'] / t['baseline']:.2f}x**",
                    mem,
                ]
            )
            print("activations", rows[-1], flush=True)
            model.zero_grad(set_to_none=True)
    return rows


def allreduce_row(device: torch.device, mb: float, world: int, reps: int) -> list:
    """The device-side codec work of one rank's int8 all-reduce of an ``mb`` MB fp32 bucket."""
    spec = DEFAULT_SPEC
    numel = int(mb * 2**20 / 4)
    chunk = -(-numel // (world * spec.block)) * spec.block
    x = torch.randn(world, chunk, device=device)
    dst = torch.empty_like(x)
    received = ops.quantize_rows(x, spec)  # stands in for what the all-to-all delivers
    gathered = ops.quantize_rows(x, spec)

    def codec_work() -> None:
        ops.quantize_rows(x, spec)
        parts = ops.dequantize_rows(*ops.split_wire(received, spec, chunk), spec, chunk)
        reduced = parts.div_(world).sum(dim=0, keepdim=True)
        ops.quantize_rows(reduced, spec)
        ops.dequantize_rows(*ops.split_wire(gathered, spec, chunk), spec, chunk, out=dst)

    t = median_seconds({"copy": lambda: dst.copy_(x), "int8": codec_work}, device, reps=reps)
    fp32_bytes = 2 * (world - 1) * chunk * 4  # a ring all-reduce's bytes per rank
    saved = fp32_bytes - wire_bytes(world * chunk, world, spec)
    return [
        f"{mb:.0f} MB fp32, W = {world}",
        f"{t['copy'] * 1e3:.2f}",
        f"{t['int8'] * 1e3:.2f}",
        f"{t['int8'] / t['copy']:.1f}x",
        f"{saved / t['int8'] / 1e9:.0f} GB/s",
    ]


def main() -> None:
    """Run the one-GPU benchmarks and write the gpu section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    reps = 3 if quick else 9
    t0 = time.perf_counter()
    codec = codec_rows(device, 1 << (16 if quick else 28), reps)
    act = activation_rows(
        device, [128] if quick else [1024, 2048], 2 if quick else 8, 64 if quick else 1024, reps
    )
    ar = [allreduce_row(device, 1 if quick else 64, 8, reps)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    body = "\n".join(
        [
            "## GPU (one device)\n",
            f"Run {today()} on {name}; torch {torch.__version__}. Command: `bash benchmarks/gpu.sh` "
            f"({time.perf_counter() - t0:.0f} s for this script).\n",
            "**Codec op** (Triton), bf16 scales, block 128, median of the repetitions; "
            "dequantize writes into a preallocated tensor like the copy:\n",
            table(
                [
                    "input",
                    "format",
                    "copy GB/s",
                    "quantize GB/s",
                    "quantize / copy",
                    "dequantize / copy",
                ],
                codec,
            ),
            "\n**Activations**: reference LLaMA, 4 layers, bf16, forward + backward, paper plan "
            "vs no agoq, same run; memory (eager forward) = agoq's stored bytes / bytes autograd "
            "saves without agoq (pass-through hook):\n",
            table(["dim", "mode", "baseline ms", "agoq ms", "step ratio", "saved memory"], act),
            "\n**int8 all-reduce, device side**: the codec work one rank does (quantize W "
            "chunks, dequantize + divide + fp32 sum, requantize, dequantize the gathered "
            "result) vs a copy of the bucket; int8 saves time on links slower than the last "
            "column (bytes saved vs a ring fp32 all-reduce per second of codec work):\n",
            table(["bucket", "copy ms", "int8 codec ms", "codec / copy", "break-even link"], ar),
            "",
        ]
    )
    print(body)
    if not args.no_write and device.type == "cuda" and not quick:
        write_section("gpu", body)
        print("wrote docs/benchmarks.md (section gpu)")


if __name__ == "__main__":
    main()
