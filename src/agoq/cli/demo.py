"""``agoq demo``: train the reference LLaMA on real text, plain PyTorch vs agoq, side by side.

Both runs use the same seed (same initial weights, same batches in the same order); the
table compares what each stores for backward (exactly, per layer), its step time and its
final losses. Writes ``demo.png`` (loss curves and memory bars) and ``demo.json`` (every
number) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..models.llama import PRESETS
from ..train import GRADS, TrainConfig, TrainResult, train
from . import user_error

TAIL = 20  # steps averaged for the final training loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``agoq demo`` (all optional)."""
    d = TrainConfig()
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument(
        "--model", default="small", choices=sorted(PRESETS), help="model preset (default small)"
    )
    parser.add_argument(
        "--plan",
        default="agoq-norm32",
        choices=["agoq-norm32", "agoq", "uniform4"],
        help="activation plan compared with plain PyTorch: agoq-norm32 (default; the paper's "
        "plan with norm inputs in fp4 blocks of 32, see docs/results.md), agoq (the paper's "
        "plan) or uniform4 (every saved tensor in 4 bits, the paper's failing ablation)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of init and data (default 0)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)"
    )
    parser.add_argument("--out", default="agoq-demo", help="output folder (default agoq-demo/)")
    parser.add_argument(
        "--batch", type=int, default=d.batch, help=f"global batch (default {d.batch})"
    )
    parser.add_argument("--seq", type=int, default=d.seq, help=f"sequence length (default {d.seq})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr:g})")
    parser.add_argument(
        "--grads",
        default="fp32",
        choices=list(GRADS),
        help="gradient all-reduce of the agoq run with --world-size 2 (default fp32)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        choices=[1, 2],
        help="1 process, or 2 gloo ranks with DDP on CPU (default 1)",
    )
    parser.add_argument(
        "--numerics-check-every",
        type=int,
        default=0,
        metavar="N",
        help="agoq run: every N steps the numerics guard measures agoq's gradient error and "
        "switches a bad kind/bucket to full precision (default 0 = off; docs/numerics-guard.md)",
    )


def _configs(args: argparse.Namespace) -> tuple[TrainConfig, TrainConfig]:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() and args.world_size == 1 else "cpu"
    common = dict(
        model=args.model,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        lr=args.lr,
        seed=args.seed,
        device=device,
        world_size=args.world_size,
    )
    base = TrainConfig(plan="none", grads="fp32", **common)
    checks = getattr(args, "numerics_check_every", 0)
    agoq = TrainConfig(plan=args.plan, grads=args.grads, numerics_check_every=checks, **common)
    base.validate()
    agoq.validate()
    return base, agoq


def _check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, before minutes of training
    (an unwritable folder would otherwise only fail at the end)."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".agoq-demo-", suffix=".tmp"):
        pass


def summary(base: TrainResult, agoq: TrainResult) -> dict:
    """The numbers the table shows, derived from the two results."""

    def rel(a: float, b: float) -> float:
        return (a - b) / b if b else math.nan

    tail_b, tail_a = base.tail_loss(TAIL), agoq.tail_loss(TAIL)
    return {
        "unit_bytes": base.unit_bytes,
        "stored_bytes": {"baseline": base.stored_bytes, "agoq": agoq.stored_bytes},
        "stored_ratio": agoq.stored_bytes / base.stored_bytes,
        "peak_saved_bytes": {"baseline": base.peak_saved_bytes, "agoq": agoq.peak_saved_bytes},
        "wire_bytes_per_step": {
            "baseline": base.wire_bytes_per_step,
            "agoq": agoq.wire_bytes_per_step,
        },
        "cuda_max_allocated": {
            "baseline": base.cuda_max_allocated,
            "agoq": agoq.cuda_max_allocated,
        },
        "median_step_s": {"baseline": base.median_step_s, "agoq": agoq.median_step_s},
        "step_time_ratio": agoq.median_step_s / base.median_step_s,
        "train_loss": {"baseline": tail_b, "agoq": tail_a, "rel": rel(tail_a, tail_b)},
        "eval_loss": {
            "baseline": base.eval_loss,
            "agoq": agoq.eval_loss,
            "rel": rel(agoq.eval_loss, base.eval_loss),
        },
    }


LABELS = {"<no module>": "loss (logits)", "norm": "final norm", "output": "LM head"}


def layer_names(base: TrainResult, agoq: TrainResult) -> list[str]:
    """Transformer layers in order, then the other modules (embedding, final norm, head,
    the loss outside any module)."""
    names = set(base.layers) | set(agoq.layers)
    layers = sorted((n for n in names if n.startswith("layers.")), key=lambda n: int(n[7:]))
    order = ["tok_embeddings", "norm", "output", "<no module>"]
    rest = sorted(names - set(layers), key=lambda n: (order.index(n) if n in order else 9, n))
    return layers + rest


def _u_mib(n: int, u: int) -> str:
    return f"{n / u:.2f} U  {n / 2**20:.1f} MiB"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def _table(base: TrainResult, agoq: TrainResult, s: dict, plan: str):
    from rich import box
    from rich.table import Table

    u = s["unit_bytes"]
    t = Table(
        title=f"plain PyTorch vs agoq (plan {plan!r}), same seed and data; "
        f"U = batch x seq x dim x 2 bytes = {_mib(u)}"
        + (" per rank" if base.local_batch != base.config["batch"] else ""),
        title_justify="left",
        caption="Bytes saved for backward in one step, counted exactly by agoq's context; "
        "fp32 training, so one saved hidden state is 2 U. Peak: most bytes held at once. "
        "Losses in nats/byte; train = mean of the last steps.",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    t.add_column("", no_wrap=True)
    t.add_column("baseline", justify="right", no_wrap=True)
    t.add_column("agoq", justify="right", no_wrap=True)
    t.add_column("agoq/base", justify="right", no_wrap=True)
    t.add_row("[bold]saved for backward[/bold]")
    for name in layer_names(base, agoq):
        b = base.layers.get(name, {}).get("stored", 0)
        a = agoq.layers.get(name, {}).get("stored", 0)
        t.add_row(
            f"  {LABELS.get(name, name)}",
            _u_mib(b, u),
            _u_mib(a, u),
            f"{a / b:.3f}x" if b else "-",
        )
    b, a = s["stored_bytes"]["baseline"], s["stored_bytes"]["agoq"]
    t.add_row(
        "  [bold]total[/bold]",
        _u_mib(b, u),
        _u_mib(a, u),
        f"[bold]{a / b:.3f}x[/bold]",
    )
    t.add_section()
    pb, pa = s["peak_saved_bytes"]["baseline"], s["peak_saved_bytes"]["agoq"]
    t.add_row("peak saved memory", _mib(pb), _mib(pa), f"{pa / pb:.3f}x")
    cb, ca = s["cuda_max_allocated"]["baseline"], s["cuda_max_allocated"]["agoq"]
    if cb is not None and ca is not None:
        t.add_row("cuda max allocated", _mib(cb), _mib(ca), f"{ca / cb:.3f}x")
    wb, wa = s["wire_bytes_per_step"]["baseline"], s["wire_bytes_per_step"]["agoq"]
    if wb is not None and wa is not None:
        t.add_row(
            "grads sent/rank/step",
            _mib(wb) + f" ({base.config['grads']})",
            _mib(wa) + f" ({agoq.config['grads']})",
            f"{wa / wb:.3f}x",
        )
    t.add_section()
    tb, ta = s["median_step_s"]["baseline"], s["median_step_s"]["agoq"]
    t.add_row("median step time", f"{tb:.3f} s", f"{ta:.3f} s", f"{ta / tb:.2f}x")
    tr, ev = s["train_loss"], s["eval_loss"]
    n = min(TAIL, len(base.losses))
    t.add_row(
        f"train loss, last {n}",
        f"{tr['baseline']:.4f}",
        f"{tr['agoq']:.4f}",
        f"{tr['rel']:+.2%}",
    )
    t.add_row(
        "held-out loss",
        f"{ev['baseline']:.4f}",
        f"{ev['agoq']:.4f}",
        f"{ev['rel']:+.2%}",
    )
    return t


def plot(base: TrainResult, agoq: TrainResult, path: Path, plan: str) -> None:
    """Loss curves and per-layer stored bytes (in U) of the two runs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = range(1, len(base.losses) + 1)
    ax1.plot(steps, base.losses, label="baseline", lw=1)
    label = f"agoq ({plan})"
    ax1.plot(steps, agoq.losses, label=label, lw=1, alpha=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/byte)")
    ax1.set_title("training loss, same seed and data")
    ax1.grid(alpha=0.3)
    ax1.legend()

    u = base.unit_bytes
    names = layer_names(base, agoq)
    x = range(len(names))
    ax2.bar(
        [i - 0.2 for i in x],
        [base.layers.get(n, {}).get("stored", 0) / u for n in names],
        0.4,
        label="baseline",
    )
    ax2.bar(
        [i + 0.2 for i in x],
        [agoq.layers.get(n, {}).get("stored", 0) / u for n in names],
        0.4,
        label=label,
    )
    ax2.set_xticks(list(x), [LABELS.get(n, n) for n in names], rotation=30, ha="right")
    ax2.set_ylabel("stored for backward (U = batch x seq x dim x 2 bytes)")
    ax2.set_title("activation memory per layer, one step")
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run ``agoq demo``; returns the exit status."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    try:
        base_cfg, agoq_cfg = _configs(args)
    except ValueError as e:  # ConfigTypeError included
        return user_error("demo", e)
    out = Path(args.out)
    try:
        _check_writable(out)
    except OSError as e:
        return user_error("demo", f"cannot use --out {args.out!r}: {e}")
    console.print(
        f"Training LLaMA '{args.model}' on Python's stdlib docstrings: {args.steps} steps of "
        f"{args.batch} x {args.seq} bytes on {base_cfg.device}"
        + (f", {args.world_size} gloo ranks" if args.world_size > 1 else "")
        + ", plain PyTorch then agoq."
    )
    results: dict[str, TrainResult] = {}
    with Progress(
        TextColumn("{task.description:10s}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for name, cfg in (("baseline", base_cfg), ("agoq", agoq_cfg)):
            task = progress.add_task(name, total=cfg.steps, loss=math.nan)

            def on_step(step: int, loss: float, task=task) -> None:
                progress.update(task, completed=step + 1, loss=loss)

            results[name] = train(cfg, on_step=on_step)
    base, agoq = results["baseline"], results["agoq"]
    s = summary(base, agoq)
    console.print(_table(base, agoq, s, args.plan))

    data = {"baseline": base.to_dict(), "agoq": agoq.to_dict(), "summary": s}
    try:
        (out / "demo.json").write_text(json.dumps(data, indent=1))
        plot(base, agoq, out / "demo.png", args.plan)
    except OSError as e:  # checked up front, but the disk may still fill up meanwhile
        return user_error("demo", f"cannot write the results to --out {args.out!r}: {e}")
    except ImportError:
        console.print(
            "matplotlib is not installed: no demo.png (pip install 'agoq[plot]'). "
            "The numbers are in demo.json.",
            style="yellow",
            markup=False,  # "[plot]" is not a style
        )
        console.print(f"wrote {out / 'demo.json'}")
        return 0
    console.print(f"wrote {out / 'demo.png'} and {out / 'demo.json'}")
    return 0
