"""``agoq plan``: predicted per-GPU memory of a LLaMA training layout, with and without agoq."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from rich.console import Console
from rich.table import Table

from agoq.cli import user_error
from agoq.planner import (
    COLUMNS,
    METHODS,
    MODELS,
    SETUPS,
    Layout,
    MemoryPrediction,
    ModelShape,
    layer_units,
    predict,
    with_accounting,
)
from agoq.quant import QuantSpec

UNITS = {"GiB": 2**30, "GB": 1e9, "MiB": 2**20, "MB": 1e6}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``agoq plan``."""
    models = "|".join(n for n in MODELS if not n.startswith("paper"))
    parser.add_argument(
        "--model",
        default="llama3-8b",
        help=f"{models}|paper-table-1, or a JSON object / file (ours or a HF config.json)",
    )
    parser.add_argument("--layers", type=int, help="override the model's depth")
    parser.add_argument("--seq", type=int, default=8192, help="sequence length")
    parser.add_argument("--mbs", type=int, default=1, help="micro-batch size")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument(
        "--schedule", default="1f1b", help="pipeline schedule (torch names: 1f1b, interleaved1f1b…)"
    )
    parser.add_argument(
        "--microbatches", type=int, help="micro-batches per step and DP rank (default 2 x pp)"
    )
    parser.add_argument("--chunks", type=int, help="model chunks per pipeline rank")
    parser.add_argument(
        "--no-sequence-parallel", action="store_true", help="TP without sequence parallelism"
    )
    parser.add_argument(
        "--zero1", action="store_true", help="shard optimizer states over DP (ZeRO-1)"
    )
    parser.add_argument("--bits", type=int, default=4, help="agoq's activation bits (stage 1)")
    parser.add_argument(
        "--format", default="fp4_e2m1", help="activation format: fp4_e2m1 or int (default fp4)"
    )
    parser.add_argument("--block", type=int, default=128, help="activation quantization block")
    parser.add_argument(
        "--no-stage-aware", action="store_true", help="same bits on every pipeline rank"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override an accounting assumption, e.g. norm_bits=16, swiglu_saves=2, "
        "expand_kv=false, logits_bytes=4, overhead_gib=0 (see docs/planner.md)",
    )
    parser.add_argument("--units", choices=sorted(UNITS), default="GiB", help="memory unit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _shape(args: argparse.Namespace) -> ModelShape:
    name = args.model
    shape = MODELS.get(name) or ModelShape.from_json(name)
    if args.layers is not None:
        shape = replace(shape, layers=args.layers)
    return shape


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        low = raw.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
        else:
            try:
                out[key.strip()] = float(raw)
            except ValueError:
                raise ValueError(f"--set {key}: {raw!r} is not a number or true/false") from None
    return out


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(
        seq=args.seq,
        mbs=args.mbs,
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        schedule=args.schedule,
        n_microbatches=args.microbatches,
        stages_per_rank=args.chunks,
        sequence_parallel=False if args.no_sequence_parallel else None,
        zero1=args.zero1,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``agoq plan``: print per-stage bits, per-layer U and per-GPU memory."""
    try:
        shape = _shape(args)
        layout = _layout(args)
        acc = with_accounting(None, _overrides(args.set))
        spec = QuantSpec(bits=args.bits, format=args.format, block=args.block)
        preds = {
            name: predict(
                shape,
                layout,
                name,
                activation_spec=spec,
                stage_aware=not args.no_stage_aware,
                accounting=acc,
            )
            for name in SETUPS
        }
        inflight = layout.inflight()
    except (ValueError, OSError, OverflowError) as e:
        return user_error("plan", e)
    units = {m: layer_units(shape, m, args.bits, acc) for m in METHODS}
    if args.json:
        print(json.dumps(_as_json(shape, layout, inflight, units, preds), indent=2))
        return 0
    _print(shape, layout, inflight, units, preds, args.units)
    return 0


def _as_json(
    shape: ModelShape,
    layout: Layout,
    inflight: list[int],
    units: dict[str, dict[str, float]],
    preds: dict[str, MemoryPrediction],
) -> dict[str, Any]:
    return {
        "model": asdict(shape),
        "layout": asdict(layout),
        "inflight": inflight,
        "layer_units": units,
        "memory_bytes": {
            k: {**asdict(p), "total": p.total, "phase": p.phase} for k, p in preds.items()
        },
    }


def _print(
    shape: ModelShape,
    layout: Layout,
    inflight: list[int],
    units: dict[str, dict[str, float]],
    preds: dict[str, MemoryPrediction],
    unit_name: str,
) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and CI: don't wrap the tables at 80 columns
    unit = UNITS[unit_name]
    console.print(
        f"[bold]{shape.name}[/bold]: {shape.layers} layers, hidden {shape.hidden}, "
        f"{shape.params / 1e9:.2f}B parameters; seq {layout.seq}, mbs {layout.mbs}, "
        f"TP {layout.tp} (sequence parallel {'on' if layout.sp else 'off'}), PP {layout.pp}, "
        f"DP {layout.dp}"
        + (f", {layout.schedule} x{layout.chunks} chunks" if layout.pp > 1 else "")
    )
    bits = preds["A+O+G"].bits
    stages = Table(title="Pipeline ranks (agoq: DBCA bits per rank)")
    stages.add_column("rank")
    per_chunk = " (of one chunk)" if layout.chunks > 1 else ""
    stages.add_column(f"in-flight micro-batches{per_chunk}", justify="right")
    stages.add_column("activation bits", justify="right")
    for r, n in enumerate(inflight):
        stages.add_row(str(r), str(n), "bf16 (kept)" if bits[r] >= 16 else f"{bits[r]:g}")
    console.print(stages)

    per_layer = Table(title="Activations stored per layer, in U = mbs x seq x hidden x 2 B")
    per_layer.add_column("method")
    for col in COLUMNS:
        per_layer.add_column(col, justify="right")
    per_layer.add_column("total", justify="right", style="bold")
    names = {"baseline": "baseline", "coat": "COAT-like FP8", "agoq": f"agoq ({bits[0]:g} bit)*"}
    for m, row in units.items():
        per_layer.add_row(names[m], *(f"{v:g}U" for v in row.values()), f"{sum(row.values()):g}U")
    console.print(per_layer)
    console.print(
        "* payload bits, as the paper's Table 1 counts; the memory below adds the block "
        "scales (e.g. 4.25 bits per element for fp4 in blocks of 128 with fp32 scales)"
    )

    mem = Table(title=f"Predicted peak memory of the busiest GPU ({unit_name})")
    for col in ("setup", "weights", "grads", "optimizer", "activations", "other"):
        mem.add_column(col, justify="left" if col == "setup" else "right")
    mem.add_column("peak", justify="right", style="bold")
    mem.add_column("vs baseline", justify="right")
    mem.add_column("peak during")
    base = preds["baseline"].total
    for name, p in preds.items():
        step = f"optimizer step (+{p.step_extra / unit:.2f} fp32 grads)"
        mem.add_row(
            name,
            f"{p.weights / unit:.2f}",
            f"{p.grads / unit:.2f}",
            f"{p.optimizer / unit:.2f}",
            f"{p.activations / unit:.2f}",
            f"{p.overhead / unit:.2f}",
            f"{p.total / unit:.2f}",
            f"{p.total / base - 1:+.1%}",
            "forward/backward" if p.phase == "forward/backward" else step,
        )
    console.print(mem)
    console.print(
        "baseline: bf16 weights, fp32 gradients, fp32 Adam (Megatron-LM mixed precision, as "
        "in the paper); A = agoq activations, G = 8-bit gradients, O = an 8-bit optimizer; "
        "other = CUDA context and workspaces. Assumptions and the check against the "
        "paper's Tables 8 and 14: docs/planner.md"
    )
