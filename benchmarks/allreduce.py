"""8-bit gradients: the int8 all-reduce vs fp32/bf16 all_reduce, and Int8GradStore vs
fp32/bf16 accumulation between micro-batches.

    python benchmarks/allreduce.py [--worlds 2 4] [--sizes-mb 1 16 64] [--reps 5]
                                   [--links none 1gbit] [--no-write]

1. Collective (gloo ranks on 127.0.0.1, one torch thread each), per gradient size in MB of
   fp32: bytes each rank sends, counted exactly (``wire_bytes``: int8 payload + fp32 block
   scales, all-to-all then all-gather) against the ring all-reduce's 2(W-1)/W x the tensor
   bytes for fp32 and bf16 (a formula, not a capture of gloo's traffic); wall time of
   ``int8_all_reduce`` and of bf16 all_reduce (cast, all_reduce, average, cast back, like
   DDP's bf16 compression hook) as ratios to fp32 ``dist.all_reduce`` + average, measured
   interleaved in the same run (each rep starts at a barrier; a rep's time is the slowest
   rank's; median of the reps); relative RMS error of the averaged result against the exact
   fp64 average. Rank r's gradient is (shared + own_r) / sqrt(2), both standard Gaussian.
   Then the all-reduce alone on each of ``--links`` (64 MB, 2 ranks): the plain loopback
   and, re-running this script under ``../shared/tools/shaped-net --rate R``, a loopback
   limited to R (both ranks' traffic shares it). Goal at 1 Gbit/s: int8 <= 0.35x fp32.
2. Storage between micro-batches (one process) on the small reference LLaMA, trained briefly
   on real text (stdlib docstrings), fed the same micro-batch gradients: bytes held between
   micro-batches by ``Int8GradStore`` (each compensation mode) vs fp32 and bf16 ``p.grad``
   accumulation, the time of one accumulation, and the relative RMS error of the
   accumulated gradient against the fp64 sum after K = 1, 4, 16, 64 micro-batches.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _shaped import link_name, run_shaped

from _report import machine, median_seconds, table, today, write_section
from agoq import QuantSpec
from agoq.gradients.allreduce import DEFAULT_SPEC, int8_all_reduce, relative_rms, wire_bytes
from agoq.gradients.storage import Int8GradStore
from agoq.spawn import run_ranks

WIRE_GOAL_FP32, WIRE_GOAL_BF16, RMS_GOAL = 0.26, 0.51, 0.01
LINK_GOAL = 0.35  # int8 / fp32 all-reduce time at 1 Gbit/s
KS = (1, 4, 16, 64)


# ----------------------------------------------------------------------- collectives


def _rank_data(rank: int, numel: int) -> torch.Tensor:
    shared = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    own = torch.randn(numel, generator=torch.Generator().manual_seed(1000 + rank))
    return (shared + own) / math.sqrt(2)


def _measure(rank: int, world: int, numel: int, specs: dict[str, QuantSpec], reps: int) -> dict:
    """Errors (rank 0) and max-over-ranks median times of every method for one size."""
    x = _rank_data(rank, numel)
    buf = {k: x.clone() for k in ("fp32", "bf16", *specs)}
    del x

    def fp32() -> None:
        dist.all_reduce(buf["fp32"])
        buf["fp32"].div_(world)

    def bf16() -> None:
        b = buf["bf16"].to(torch.bfloat16)
        dist.all_reduce(b)
        buf["bf16"].copy_(b.div_(world))

    def int8(name: str):
        return lambda: int8_all_reduce(buf[name], average=True, spec=specs[name])

    fns = {"fp32": fp32, "bf16": bf16, **{k: int8(k) for k in specs}}
    # Error: one call of each on the rank's data, against the exact fp64 average (rank 0
    # regenerates every rank's data to compute it).
    for f in fns.values():
        f()
    err = {}
    if rank == 0:
        exact = torch.zeros(numel, dtype=torch.float64)
        for r in range(world):
            exact += _rank_data(r, numel).double()
        exact /= world
        err = {k: relative_rms(buf[k], exact) for k in fns}
    # Time: interleaved reps, each op started at a barrier; the collective is done when its
    # slowest rank is, so a rep counts the max over ranks.
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, f in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            f()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rep:  # rep 0 warms up
                times[k].append(t.item())
    return {"numel": numel, "err": err, "time": {k: statistics.median(v) for k, v in times.items()}}


def _collective_rank(
    rank: int, world: int, sizes: list[int], specs: dict[str, QuantSpec], reps: int
) -> list[dict]:
    torch.set_num_threads(1)
    return [_measure(rank, world, numel, specs, reps) for numel in sizes]


def run_collectives(
    world: int, sizes: list[int], specs: dict[str, QuantSpec], reps: int, timeout: float = 600
) -> list[dict]:
    """Spawn ``world`` gloo ranks; rank 0's results (errors) with the max-over-ranks times."""
    return run_ranks(_collective_rank, world, sizes, specs, reps, timeout=timeout)[0]


def _spec_name(spec: QuantSpec) -> str:
    return f"int8 block {spec.block}, {str(spec.scale_dtype).removeprefix('torch.')} scales"


def int8_specs() -> dict[str, QuantSpec]:
    """The library default first, then the two ways to 1 + 1/64 bytes per element."""
    specs = {f"{_spec_name(DEFAULT_SPEC)} (default)": DEFAULT_SPEC}
    for alt in (
        QuantSpec(bits=8, format="int", block=256),
        QuantSpec(bits=8, format="int", block=128, scale_dtype=torch.bfloat16),
    ):
        if alt != DEFAULT_SPEC:
            specs[_spec_name(alt)] = alt
    return specs


def collective_rows(args: argparse.Namespace) -> tuple[list[list], list[str]]:
    """Table rows and printed lines for every (world, size, method)."""
    sizes = [int(mb * 2**20) // 4 for mb in args.sizes_mb]
    specs = int8_specs()
    rows, lines = [], []
    for world in args.worlds:
        t0 = time.perf_counter()
        results = run_collectives(world, sizes, specs, args.reps)
        for mb, res in zip(args.sizes_mb, results, strict=True):
            n = res["numel"]
            ring = 2 * (world - 1) / world  # ring all-reduce: reduce-scatter + all-gather
            sent = {"fp32": ring * 4 * n, "bf16": ring * 2 * n}
            sent.update({k: wire_bytes(n, world, spec) for k, spec in specs.items()})
            t, e = res["time"], res["err"]
            for k in ("fp32", "bf16", *specs):
                r32, r16 = sent[k] / sent["fp32"], sent[k] / sent["bf16"]
                goals = ""
                if k in specs:
                    ok = r32 <= WIRE_GOAL_FP32 and r16 <= WIRE_GOAL_BF16 and e[k] <= RMS_GOAL
                    goals = "yes" if ok else "**no**"
                rows.append(
                    [
                        world,
                        f"{mb:g}",
                        k,
                        f"{sent[k] / 2**20:.3f}",
                        f"**{r32:.4f}x**" if k in specs else f"{r32:.2f}x",
                        f"**{r16:.4f}x**" if k in specs else f"{r16:.2f}x",
                        f"{1e3 * t[k]:.1f}",
                        f"**{t[k] / t['fp32']:.2f}x**"
                        if k in specs
                        else f"{t[k] / t['fp32']:.2f}x",
                        f"**{e[k]:.2e}**" if k in specs else f"{e[k]:.2e}",
                        goals,
                    ]
                )
                lines.append(
                    f"W={world} {mb:g} MB {k}: sent {sent[k] / 2**20:.3f} MiB = {r32:.4f}x fp32, "
                    f"{r16:.4f}x bf16; {1e3 * t[k]:.1f} ms = {t[k] / t['fp32']:.2f}x fp32; "
                    f"rel RMS {e[k]:.2e}" + (f"; goals met: {goals}" if goals else "")
                )
                print(lines[-1], flush=True)
        print(f"  (world {world}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return rows, lines


def link_times(mb: float, reps: int) -> dict[str, float]:
    """Slowest-rank median seconds of fp32 / bf16 / int8 (default spec) all-reduce of ``mb``
    MB on 2 ranks, on whatever network this process has."""
    numel = int(mb * 2**20) // 4
    res = run_collectives(2, [numel], {"int8": DEFAULT_SPEC}, reps)[0]
    return res["time"]


def link_rows(args: argparse.Namespace) -> tuple[list[list], list[str]]:
    """The all-reduce alone on each link: table rows and printed lines."""
    rows, lines = [], []
    for link in args.links:
        if link == "none":
            t: dict | str = link_times(args.link_mb, args.reps)
        else:
            extra = ["--link-mb", str(args.link_mb), "--reps", str(args.reps)]
            t = run_shaped(link, Path(__file__).resolve(), extra)
        if isinstance(t, str):
            rows.append([link_name(link), t, "", "", "", ""])
            lines.append(f"{link}: {t}")
            print(lines[-1], flush=True)
            continue
        r16, r8 = t["bf16"] / t["fp32"], t["int8"] / t["fp32"]
        goal = LINK_GOAL if link == "1gbit" else None
        met = "-" if goal is None else ("yes" if r8 <= goal else f"**no** ({r8:.2f}x)")
        rows.append(
            [
                link_name(link),
                f"{1e3 * t['fp32']:.0f}",
                f"{1e3 * t['bf16']:.0f} ({r16:.2f}x)",
                f"{1e3 * t['int8']:.0f} (**{r8:.2f}x**)",
                "-" if goal is None else f"<= {goal}x",
                met,
            ]
        )
        lines.append(
            f"{link} {args.link_mb:g} MB W=2: fp32 {1e3 * t['fp32']:.0f} ms, bf16 "
            f"{1e3 * t['bf16']:.0f} ms ({r16:.2f}x), int8 {1e3 * t['int8']:.0f} ms ({r8:.2f}x)"
        )
        print(lines[-1], flush=True)
    return rows, lines


# ------------------------------------------------------------------------ storage


def _model_and_batches(args: argparse.Namespace):
    from agoq.data import VOCAB_SIZE, sample, split, text_tokens
    from agoq.models.llama import build

    torch.manual_seed(0)
    model = build("small", vocab_size=VOCAB_SIZE)
    train, _ = split(text_tokens())
    gen = torch.Generator().manual_seed(0)

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1))

    # A few steps first, so the gradients are those of a model that has started to learn
    # rather than of the initialisation.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.train_steps):
        opt.zero_grad(set_to_none=True)
        loss_of(sample(train, args.batch, args.seq, gen)).backward()
        opt.step()
    batches = [sample(train, args.batch, args.seq, gen) for _ in range(max(KS))]
    return model, loss_of, batches


def storage_rows(args: argparse.Namespace) -> tuple[list[list], list[list], int, list[str]]:
    """(memory/time rows, error-vs-K rows, parameter count, printed lines)."""
    model, loss_of, batches = _model_and_batches(args)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    stores = {
        "none": {"compensation": "none"},
        "stochastic": {"compensation": "stochastic"},
        "residual (int8)": {"compensation": "residual"},
        "residual (int4)": {
            "compensation": "residual",
            "residual_spec": QuantSpec(bits=4, format="int", block=256),
        },
    }
    # Each accumulator gets its own stand-in parameters, fed the same gradient tensors.
    shadows = {k: [torch.nn.Parameter(torch.empty_like(p)) for p in params] for k in stores}
    store = {k: Int8GradStore(shadows[k], seed=0, **kw) for k, kw in stores.items()}
    exact = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    fp32 = [torch.zeros_like(p) for p in params]
    bf16 = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]

    def flat(ts) -> torch.Tensor:
        return torch.cat([t.reshape(-1).double() for t in ts])

    errors: dict[str, dict[int, float]] = {k: {} for k in ["fp32", "bf16", *stores]}
    held: dict[str, int] = {}
    t0 = time.perf_counter()
    for k, tokens in enumerate(batches, start=1):
        model.zero_grad(set_to_none=True)
        loss_of(tokens).backward()
        grads = [p.grad for p in params]
        for e, f, b, g in zip(exact, fp32, bf16, grads, strict=True):
            e.add_(g)
            f.add_(g)
            b.add_(g.to(torch.bfloat16))  # a bf16 model's gradient, summed in bf16
        for name, s in store.items():
            for sp, g in zip(shadows[name], grads, strict=True):
                sp.grad = g
            s.accumulate()
            held[name] = s.nbytes
        if k in KS:
            ref = flat(exact)
            errors["fp32"][k] = relative_rms(flat(fp32), ref)
            errors["bf16"][k] = relative_rms(flat(bf16), ref)
            for name, s in store.items():
                errors[name][k] = relative_rms(flat(s.read()), ref)
    print(f"  ({max(KS)} micro-batches: {time.perf_counter() - t0:.0f} s)", flush=True)

    # Time of one accumulation step for the whole model (gradients already computed).
    g_last = [p.grad for p in params]

    def store_step(name: str):
        def step() -> None:
            for sp, g in zip(shadows[name], g_last, strict=True):
                sp.grad = g
            store[name].accumulate()

        return step

    fns = {
        "fp32": lambda: [f.add_(g) for f, g in zip(fp32, g_last, strict=True)],
        "bf16": lambda: [b.add_(g.to(torch.bfloat16)) for b, g in zip(bf16, g_last, strict=True)],
        **{name: store_step(name) for name in stores},
    }
    secs = median_seconds(fns, torch.device("cpu"), reps=args.reps, warmup=1)

    mem = {"fp32": 4 * n, "bf16": 2 * n, **held}
    mem_rows, err_rows, lines = [], [], []
    for name in ["fp32", "bf16", *stores]:
        mem_rows.append(
            [
                name,
                f"{mem[name] / 2**20:.2f}",
                f"**{mem[name] / mem['fp32']:.3f}x**",
                f"{mem[name] / mem['bf16']:.3f}x",
                f"{8 * mem[name] / n:.3f}",
                f"{1e3 * secs[name]:.1f}",
                f"{secs[name] / secs['fp32']:.1f}x",
            ]
        )
        e = errors[name]
        err_rows.append(
            [name]
            + [f"**{e[k]:.2e}**" if k == 16 else f"{e[k]:.2e}" for k in KS]
            + [
                f"{e[max(KS)] / e[1]:.1f}x" if e[1] > 0 else "-",
                "yes" if e[16] <= RMS_GOAL else "**no**",
            ]
        )
        lines.append(
            f"{name}: held {mem[name] / 2**20:.2f} MiB ({mem[name] / mem['fp32']:.3f}x fp32), "
            f"accumulate {1e3 * secs[name]:.1f} ms; rel RMS error K="
            + ", ".join(f"{k}: {e[k]:.2e}" for k in KS)
        )
        print(lines[-1], flush=True)
    return mem_rows, err_rows, n, lines


# --------------------------------------------------------------------------- main


def main() -> None:
    """Run both parts and write the "gradients" section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--links", nargs="+", default=["none", "1gbit"])
    ap.add_argument("--link-mb", type=float, default=64.0)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    ap.add_argument("--child-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child_json:  # this run is the one under shaped-net: measure, hand back JSON
        Path(args.child_json).write_text(json.dumps(link_times(args.link_mb, args.reps)))
        return
    start = time.perf_counter()

    coll_rows, _ = collective_rows(args)
    lrows, _ = link_rows(args)
    mem_rows, err_rows, n, _ = storage_rows(args)

    cmd = "python benchmarks/allreduce.py"
    parts = [
        f"Run {today()} on {machine()}. Command: `{cmd}`. gloo over 127.0.0.1, one torch "
        f"thread per rank; int8 rounds to nearest.\n",
        "**All-reduce** (average of W ranks' fp32 gradients). Wire bytes are per rank: int8 "
        "is `wire_bytes` (all-to-all + all-gather of W-1 chunks each, payload + scales, "
        "counted exactly); fp32/bf16 use the ring all-reduce's 2(W-1)/W x tensor bytes "
        f"(a formula). Goals: wire <= {WIRE_GOAL_FP32}x fp32 and <= {WIRE_GOAL_BF16}x bf16, "
        f"relative RMS error <= {RMS_GOAL:.0%} vs the exact fp64 average. Times: median of "
        f"{args.reps} interleaved reps, each from a barrier, slowest rank; bf16 includes "
        "both casts (as DDP's bf16 hook), int8 includes quantize/dequantize. Ranks share the "
        "machine's cores, so times are a CPU/loopback figure, not a network one. bf16 scales "
        "at block 128 and fp32 scales at block 256 both cost 1/64 byte per element.\n",
        table(
            [
                "W",
                "MB (fp32)",
                "method",
                "MiB sent / rank",
                "/ fp32 bytes",
                "/ bf16 bytes",
                "ms",
                "/ fp32 time",
                "rel RMS vs fp64",
                "goals met",
            ],
            coll_rows,
        )
        + "\n",
        f"**All-reduce alone on a link** ({args.link_mb:g} MB of fp32 gradients, 2 ranks; "
        "times as above, ms; loopback = unshaped 127.0.0.1, the others under "
        "`../shared/tools/shaped-net --rate R`, which limits the loopback that both ranks' "
        f"traffic shares). Goal at 1 Gbit/s: int8 <= {LINK_GOAL}x fp32. On the plain "
        "loopback the link is not the bottleneck and the codec's passes over memory cost "
        "more than the bytes they save.\n",
        table(["link", "fp32 ms", "bf16 ms", "int8 ms", "goal", "met"], lrows) + "\n",
        f"**Gradient memory between micro-batches** (small reference LLaMA, {n:,} parameters, "
        f"fp32 gradients; micro-batch {args.batch} x {args.seq} tokens of stdlib docstrings, "
        f"after {args.train_steps} AdamW steps). `Int8GradStore.nbytes` after the "
        "micro-batches, counted exactly (payload + scales, + the residual's); one "
        "accumulation = folding the whole model's gradients (median of "
        f"{args.reps}).\n",
        table(
            [
                "accumulator",
                "MiB held",
                "/ fp32",
                "/ bf16",
                "bits / element",
                "accumulate ms",
                "/ fp32 time",
            ],
            mem_rows,
        )
        + "\n",
        "**Accumulation error** (relative RMS of the accumulated gradient, all parameters, vs "
        "the fp64 sum of the same micro-batch gradients; bf16 = each gradient rounded to bf16 "
        f"and summed in bf16). Goal <= {RMS_GOAL:.0%} at K = 16.\n",
        table(
            ["accumulator", *[f"K = {k}" for k in KS], f"K={max(KS)} / K=1", "goal met (K=16)"],
            err_rows,
        )
        + "\n",
    ]
    print(f"total {time.perf_counter() - start:.0f} s")
    if not args.no_write:
        write_section("gradients", "## Gradients\n\n" + "\n".join(parts))
        print("wrote docs/benchmarks.md (section gradients)")
    else:
        print("\n".join(parts))


if __name__ == "__main__":
    main()
