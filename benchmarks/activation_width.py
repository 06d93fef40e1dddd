"""Activation step-time overhead against model width: paper plan vs no agoq, eager and compiled.

    python benchmarks/activation_width.py [--no-write] [--quick] [--dims 256,1024,2048]

The reference LLaMA (2 layers, head dim 64, LLaMA's SwiGLU width, fp32: this CPU's bf16
GEMMs run at 0.3 GFLOP/s) at each width, on one batch of text; a training step is forward +
backward. Four configurations per width, timed interleaved in one run (median): no agoq
and the paper plan, each eager and with every block ``torch.compile``d (inductor,
fullgraph; agoq's hooks inlined). Memory held for backward and the step's peak are read
from the process for each (see ``_act_memory.py``); agoq's exact count is shown next to it.
The codec's share of an eager agoq step is timed in one extra step.

Goals (issue 11): compiled <= 1.10x at dim >= 1024; eager <= 1.3x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _act_memory import CHILD_FLAG, child_output, measure_step, mib, paired, run_child

from _report import machine, table, today, write_section
from agoq import ActivationPlan, quantize_activations
from agoq.data import VOCAB_SIZE, sample, text_tokens
from agoq.models.llama import LlamaConfig, build

N_LAYERS = 2


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))


def forward_fn(model: torch.nn.Module, batch: torch.Tensor, ctx: object | None):
    """A function running the forward (inside ``ctx`` when given) and returning the loss."""

    def run() -> torch.Tensor:
        if ctx is None:
            return loss_fn(model, batch)
        with ctx:  # type: ignore[attr-defined]
            return loss_fn(model, batch)

    return run


def codec_seconds(step: Callable[[], None]) -> float:
    """CPU seconds spent inside the codec (quantize + dequantize) during one ``step()``."""
    from agoq.activations import context, store

    spent = [0.0]
    q, dq = context.quantize, store.dequantize

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - t0

        return wrapper

    context.quantize, store.dequantize = timed(q), timed(dq)
    try:
        step()
    finally:
        context.quantize, store.dequantize = q, dq
    return spent[0]


def configs(dim: int, batch: torch.Tensor) -> tuple[dict, object]:
    """The four forward functions at one width (no agoq / paper plan, eager / compiled),
    and the agoq context they share."""
    cfg = LlamaConfig(
        dim=dim, n_layers=N_LAYERS, n_heads=dim // 64, vocab_size=VOCAB_SIZE, max_seq_len=512
    )
    torch._dynamo.reset()  # a width's blocks compile for its shapes only (no dynamic graph)
    torch.manual_seed(0)
    model = build(cfg)
    cmodel = copy.deepcopy(model)
    for layer in cmodel.layers.values():
        layer.compile(backend="inductor", fullgraph=True)
    ctx = quantize_activations(ActivationPlan.agoq())
    fwd = {
        "eager base": forward_fn(model, batch, None),
        "eager agoq": forward_fn(model, batch, ctx),
        # The hooks alone (every save kept untouched): agoq's Python and torch's cost of
        # Python saved-tensor and module hooks, without codec or recompute.
        "eager hooks": forward_fn(model, batch, quantize_activations(ActivationPlan.keep_all())),
        "compiled base": forward_fn(cmodel, batch, None),
        "compiled agoq": forward_fn(cmodel, batch, ctx),
    }
    return fwd, ctx


def _step(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: f().backward()


def measure_width(dim: int, batch: torch.Tensor, reps: int) -> dict:
    """Step times, codec share, exact agoq bytes and parameter count at one width."""
    fwd, ctx = configs(dim, batch)
    t_warm = time.perf_counter()
    for name, f in fwd.items():  # compiles; one more warm step for the compiled ones
        _step(f)()
        if name.startswith("compiled"):
            _step(f)()
    t_warm = time.perf_counter() - t_warm
    times: dict[str, list[float]] = {k: [] for k in fwd}
    walls: dict[str, list[float]] = {k: [] for k in fwd}
    for _ in range(reps):
        for k, f in fwd.items():
            t0, w0 = time.thread_time(), time.perf_counter()
            _step(f)()
            times[k].append(time.thread_time() - t0)
            walls[k].append(time.perf_counter() - w0)
    out: dict = {k: statistics.median(v) for k, v in times.items()}
    out["wall"] = {k: statistics.median(v) for k, v in walls.items()}
    out["ratio"] = {
        m: paired(times[f"{m} agoq"], times[f"{m} base"]) for m in ("eager", "compiled")
    }
    out["hooks ratio"] = paired(times["eager hooks"], times["eager base"])[0]
    out["wall ratio"] = {
        m: paired(walls[f"{m} agoq"], walls[f"{m} base"])[0] for m in ("eager", "compiled")
    }
    ctx.report.clear()  # type: ignore[attr-defined]
    out["codec"] = codec_seconds(_step(fwd["eager agoq"]))
    out["exact agoq"] = ctx.report.stored_bytes  # type: ignore[attr-defined]
    out["warm"] = t_warm
    return out


def memory_child(args: list[str]) -> None:
    """In the child process: (held, peak) bytes of each configuration at each width."""
    dims = [int(d) for d in args[0].split(",")]
    batch = sample(text_tokens(), int(args[1]), int(args[2]) + 1, torch.Generator().manual_seed(0))
    torch.set_num_threads(1)
    torch._dynamo.config.automatic_dynamic_shapes = False
    result = {}
    for dim in dims:
        fwd, _ = configs(dim, batch)
        for name, f in fwd.items():
            if name == "eager hooks":
                continue
            _step(f)()  # compile / warm: the measured step is a steady-state one
            result[f"{dim} {name}"] = measure_step(f)
    child_output(result)


def main() -> None:
    """Measure every width and write the activation-width section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="256,1024,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="dims 256,1024, 2 reps (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.dims, args.reps = "256,1024", 2
    # One thread: on a shared machine an OpenMP team waits at every barrier for a member
    # that was descheduled (milliseconds per op), which would time the neighbours, not agoq.
    torch.set_num_threads(1)
    torch._dynamo.config.automatic_dynamic_shapes = False
    dims = [int(d) for d in args.dims.split(",")]
    batch = sample(text_tokens(), args.batch, args.seq + 1, torch.Generator().manual_seed(0))
    mem = run_child(__file__, [args.dims, str(args.batch), str(args.seq)])

    rows, mem_rows, goals = [], [], []
    t_start = time.perf_counter()
    for dim in dims:
        # More repetitions where a step is short: every width gets ~10 s per configuration.
        r = measure_width(dim, batch, args.reps * {256: 4}.get(dim, 1))
        r["mem"] = {
            k: mem[f"{dim} {k}"]
            for k in ("eager base", "eager agoq", "compiled base", "compiled agoq")
        }
        cfg = LlamaConfig(dim=dim, n_layers=N_LAYERS, n_heads=dim // 64, vocab_size=VOCAB_SIZE)
        r["params"] = sum(p.numel() for p in build(cfg).parameters())
        eager_r, comp_r = r["ratio"]["eager"], r["ratio"]["compiled"]
        hooks, codec = r["hooks ratio"], r["codec"] / r["eager base"]
        eb, ea, cb, ca = (
            r[k] for k in ("eager base", "eager agoq", "compiled base", "compiled agoq")
        )
        rows.append(
            [
                dim,
                f"{r['params'] / 1e6:.1f}M",
                f"{eb * 1e3:.0f}",
                f"{ea * 1e3:.0f} (**{eager_r[0]:.2f}x**, {eager_r[1]:.2f}-{eager_r[2]:.2f})",
                f"{(hooks - 1) * 100:+.0f}% / {codec * 100:+.0f}% / "
                f"{(eager_r[0] - hooks - codec) * 100:+.0f}%",
                f"{cb * 1e3:.0f}",
                f"{ca * 1e3:.0f} (**{comp_r[0]:.2f}x**, {comp_r[1]:.2f}-{comp_r[2]:.2f})",
                f"{r['wall ratio']['eager']:.2f}x / {r['wall ratio']['compiled']:.2f}x",
            ]
        )
        m = r["mem"]
        mem_rows.append(
            [
                dim,
                f"{mib(m['eager base'][0])} / {mib(m['eager base'][1])}",
                f"**{mib(m['eager agoq'][0])}** / {mib(m['eager agoq'][1])} "
                f"(exact {mib(r['exact agoq'])})",
                f"{mib(m['compiled base'][0])} / {mib(m['compiled base'][1])}",
                f"**{mib(m['compiled agoq'][0])}** / {mib(m['compiled agoq'][1])}",
                f"{m['eager agoq'][0] / m['eager base'][0]:.2f} / "
                f"{m['compiled agoq'][0] / m['compiled base'][0]:.2f}",
            ]
        )
        print(rows[-1], mem_rows[-1], f"(compile + warm-up {r['warm']:.0f} s)", flush=True)
        eager_ok = eager_r[0] <= 1.3
        goals.append(
            f"dim {dim}: eager {eager_r[0]:.2f}x {'met' if eager_ok else 'MISSED'} (<= 1.3x)"
        )
        if dim >= 1024:
            ok = comp_r[0] <= 1.10
            goals[-1] += f", compiled {comp_r[0]:.2f}x {'met' if ok else 'MISSED'} (<= 1.10x)"
    for g in goals:
        print(g)
    print(f"timing part: {time.perf_counter() - t_start:.0f} s")

    body = [
        f"Run {today()} on {machine()}. Command: `python benchmarks/activation_width.py`.\n",
        f"Reference LLaMA, {N_LAYERS} layers, head dim 64 (MHA), LLaMA's SwiGLU width, fp32 "
        f"(bf16 GEMMs on this CPU run at 0.3 GFLOP/s), batch {args.batch} x seq {args.seq} of "
        "text, 1 thread (on this shared machine a 2-thread OpenMP team waits milliseconds at a "
        "barrier whenever a neighbour's process takes its core). Step = forward + backward, median of "
        f"{args.reps} interleaved steps ({4 * args.reps} at dim 256); compiled = every block "
        "`torch.compile`d (inductor, fullgraph) with agoq's hooks inlined. agoq = the paper "
        "plan (fp4 blocks of 128, recompute). Eager overhead, in % of the step without agoq: "
        "hooks = the context with a keep-everything plan (agoq's Python per save and module "
        "call, and torch's cost of Python saved-tensor and module hooks), codec = CPU time inside "
        "agoq's quantize + dequantize calls in an eager agoq step, rest = what is left "
        "(recompute, RMSNorm's own backward, allocation; negative when agoq's smaller "
        "activations save more than it costs; all three are differences of noisy medians).\n",
        "**Step time, CPU ms** of the one compute thread (time spent descheduled while the "
        "neighbours on this shared machine run is not agoq's; the wall-clock ratios of the "
        "same steps are in the last column). Ratio to no agoq in the same mode = median over "
        "the rounds of each round's ratio (both run back to back in a round), with the "
        "quartiles of those ratios:\n",
        table(
            [
                "dim",
                "params",
                "eager, no agoq",
                "eager, agoq",
                "eager overhead: hooks / codec / rest",
                "compiled, no agoq",
                "compiled, agoq",
                "wall clock: eager / compiled",
            ],
            rows,
        ),
        "\n**Memory held for backward / step peak, MiB** (read from a child process: "
        "resident bytes after the forward minus before, and the step's high-water mark minus "
        "the start, with malloc mapping every block >= 4 KiB so that freed memory leaves at "
        "once (see `benchmarks/_act_memory.py`); exact = agoq's own count of what it stores):\n",
        table(
            [
                "dim",
                "eager, no agoq",
                "eager, agoq",
                "compiled, no agoq",
                "compiled, agoq",
                "held, agoq / no agoq (eager / compiled)",
            ],
            mem_rows,
        ),
        "\nGoals: " + "; ".join(goals) + ".\n",
    ]
    if not args.no_write:
        write_section(
            "activation_width", "## Activation overhead against width\n\n" + "\n".join(body)
        )
        print("wrote docs/benchmarks.md (section activation_width)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        memory_child(sys.argv[2:])
    else:
        main()
