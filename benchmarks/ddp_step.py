"""DDP training step time, 2 gloo ranks: DDP's default all-reduce vs torch's fp16 compress
hook vs agoq's int8 hook (with and without error feedback), on three links.

    python benchmarks/ddp_step.py [--models mlp base] [--links none 1gbit 10gbit]
                                  [--steps 4] [--no-write]

A step is ``zero_grad`` + forward + backward (DDP reduces the gradients in it) + AdamW. Each
rank runs one torch thread (two ranks on this machine's cores). Per model, the four methods
train identical copies side by side: step by step in turn, each step started at a barrier
and timed on its slowest rank; median over ``--steps`` steps after warm-up (DDP rebuilds
its buckets after its first step), and the ratio to the default is the median of the
per-step ratios (the methods of one step run back to back, so load drift cancels). Links: ``none`` is the plain loopback; ``1gbit`` and
``10gbit`` re-run this script under ``../shared/tools/shaped-net --rate R`` (a private
network namespace whose loopback is rate-limited with tc tbf; both ranks' traffic shares
the one limited link). Models: a plain MLP of ~25M parameters (comm-bound; batch 64) and
the reference LLaMA ``base`` preset (~27M parameters; batch 2 x 64 tokens).

Goals (issue 11): at 1 Gbit/s agoq <= 0.6x the default step time; unshaped <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _shaped import SHAPED_NET, link_name, run_shaped

from _report import machine, table, today, write_section
from agoq.spawn import run_ranks

METHODS = ("default", "fp16 hook", "agoq int8", "agoq int8 + EF")
GOAL_SHAPED, GOAL_UNSHAPED = 0.6, 1.15


# ------------------------------------------------------------------------------ models


def _mlp() -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(2048, 2048), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return _mlp()
    from agoq.models.llama import build

    return build(name)


def _loss_fn(name: str, model: torch.nn.Module, rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    if name == "mlp":
        x = torch.randn(64, 2048, generator=g)
        return lambda: model(x).square().mean()
    vocab = 4096
    tokens = torch.randint(0, vocab, (2, 65), generator=g)

    def loss() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)
        )

    return loss


# ------------------------------------------------------------------------------- ranks


def _arm(name: str, method: str):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from agoq.gradients import Int8AllReduceState, int8_allreduce

    ddp = DDP(_model(name))
    if method == "fp16 hook":
        ddp.register_comm_hook(None, fp16_compress_hook)
    elif method.startswith("agoq"):
        state = Int8AllReduceState(error_feedback=method.endswith("EF"), model=ddp)
        ddp.register_comm_hook(state, int8_allreduce)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    return ddp, opt


def _rank(rank: int, world: int, models: list[str], steps: int, warmup: int) -> dict:
    out: dict = {}
    for name in models:
        arms = {m: _arm(name, m) for m in METHODS}
        n_params = sum(p.numel() for p in arms["default"][0].parameters())
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for step in range(warmup + steps):
            # Who goes first rotates, so drift and cache effects hit every method alike.
            order = METHODS[step % 4 :] + METHODS[: step % 4]
            for m in order:
                ddp, opt = arms[m]
                loss = _loss_fn(name, ddp, rank, step)
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if step >= warmup:
                    times[m].append(t.item())
        for ddp, _ in arms.values():
            ddp.zero_grad(set_to_none=True)
        out[name] = {
            "params": n_params,
            "median": {m: statistics.median(v) for m, v in times.items()},
            "min": {m: min(v) for m, v in times.items()},
            # Per step, the methods ran back to back: the ratio of each step to the
            # default's same step cancels the load drift of a shared machine.
            "ratio": {
                m: statistics.median(a / b for a, b in zip(v, times["default"], strict=True))
                for m, v in times.items()
            },
        }
        del arms
    return out


def measure(models: list[str], steps: int, warmup: int) -> dict:
    """Run the ranks on the current network; rank 0's figures (slowest-rank times)."""
    return run_ranks(_rank, 2, models, steps, warmup, timeout=1800)[0]


# -------------------------------------------------------------------------------- main


def _run_link(link: str, args: argparse.Namespace) -> dict | str:
    common = ["--models", *args.models, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if link == "none":
        return measure(args.models, args.steps, args.warmup)
    return run_shaped(link, Path(__file__).resolve(), common, args.shaped_net)


def main() -> None:
    """Measure every link and write the "ddp_step" section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "base"], choices=["mlp", "base"])
    ap.add_argument("--links", nargs="+", default=["none", "1gbit", "10gbit"])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shaped-net", type=Path, default=SHAPED_NET)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    ap.add_argument("--child-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child_json:  # this run is the one under shaped-net: measure, hand back JSON
        res = measure(args.models, args.steps, args.warmup)
        Path(args.child_json).write_text(json.dumps(res))
        return
    start = time.perf_counter()
    results = {}
    for link in args.links:
        t0 = time.perf_counter()
        results[link] = _run_link(link, args)
        if isinstance(results[link], str):
            print(f"link {link}: {results[link]}", flush=True)
            continue
        for name, r in results[link].items():
            print(
                f"link {link}, {name}: "
                + ", ".join(
                    f"{m} {1e3 * t:.0f} ms ({r['ratio'][m]:.2f}x; min "
                    f"{r['min'][m] / r['min']['default']:.2f}x)"
                    for m, t in r["median"].items()
                ),
                flush=True,
            )
        print(f"  ({link}: {time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    for link in args.links:
        goal = GOAL_UNSHAPED if link == "none" else GOAL_SHAPED if link == "1gbit" else None
        if isinstance(results[link], str):
            rows.append([link_name(link), results[link], *[""] * (len(METHODS) + 2)])
            continue
        for name, r in results[link].items():
            med, ratio = r["median"], r["ratio"]
            met = "-"
            if goal is not None:
                met = ", ".join(
                    f"{tag} " + ("yes" if ratio[m] <= goal else "**no**")
                    for tag, m in (("int8", "agoq int8"), ("EF", "agoq int8 + EF"))
                )
            rows.append(
                [
                    link_name(link),
                    f"{name} ({r['params'] / 1e6:.1f}M)",
                    *[
                        f"{1e3 * med[m]:.0f} ({ratio[m]:.2f}x)"
                        if not m.startswith("agoq")
                        else f"{1e3 * med[m]:.0f} (**{ratio[m]:.2f}x**)"
                        for m in METHODS
                    ],
                    "-" if goal is None else f"<= {goal}x",
                    met,
                ]
            )
    body = "\n".join(
        [
            "## DDP training step\n",
            f"Run {today()} on {machine()}. Command: `python benchmarks/ddp_step.py` (it runs "
            "itself under `../shared/tools/shaped-net --rate 1gbit` and `--rate 10gbit` for "
            "the shaped links). 2 gloo ranks on 127.0.0.1, one torch thread each; a step is "
            "zero_grad + forward + backward (with DDP's reduction) + AdamW; median of "
            f"{args.steps} steps after {args.warmup} warm-up steps, slowest rank, the four "
            "methods in turn on identical copies. Step time in ms (in brackets the median of "
            "the per-step ratios to DDP's default: the methods of a step run back to back, "
            "so the load of a shared machine cancels). "
            "MLP: 6 x Linear(2048, 2048) + GELU, batch 64; LLaMA `base`: batch 2 x 64 tokens. "
            "agoq: `Int8AllReduceState` + `int8_allreduce` (block 128, bf16 scales; the "
            "reduction overlaps backward on the state's comm thread), EF = error feedback. "
            "Both ranks share this machine's cores and one shaped link.\n",
            table(["link", "model", *[f"{m} ms" for m in METHODS], "agoq goal", "met"], rows),
            "",
        ]
    )
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.no_write:
        print(body)
    else:
        write_section("ddp_step", body)
        print("wrote docs/benchmarks.md (section ddp_step)")


if __name__ == "__main__":
    main()
