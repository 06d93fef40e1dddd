"""Per-rank peak stored activation bytes in real pipeline schedules, stage-aware vs uniform.

    python benchmarks/pipeline.py [--no-write]

Runs torch.distributed.pipelining schedules on gloo ranks (1F1B on 4 ranks; Interleaved1F1B
on 4 ranks x 2 chunks, the paper's setting; 8 micro-batches) with the reference LLaMA, each
rank's stage(s) wrapped by ``agoq.quantize_stage``. The peak is the most bytes agoq held at
once on a rank over the whole schedule (``report.peak_bytes``: stored tensors from their
creation until autograd frees them). Uniform = the paper plan at 4 bits on every rank;
stage-aware = ``ActivationPlan.for_stage`` from each schedule's in-flight counts.
"""

from __future__ import annotations

import argparse

import torch

from _report import machine, table, today, write_section
from agoq.spawn import run_ranks

VOCAB, MB, SEQ, BATCH = 256, 8, 128, 8


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def _rank(rank: int, world: int, schedule: str, aware: bool, layers: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as S

    from agoq import ActivationPlan
    from agoq.data import sample, text_tokens
    from agoq.models.llama import LlamaStage, build
    from agoq.pipeline import quantize_stage

    cls = {"1f1b": S.Schedule1F1B, "interleaved1f1b": S.ScheduleInterleaved1F1B}[schedule]
    chunks = 2 if cls is S.ScheduleInterleaved1F1B else 1
    n_stages = world * chunks
    torch.manual_seed(0)
    full = build("small", dim=128, n_layers=layers, n_heads=4, vocab_size=VOCAB, max_seq_len=SEQ)
    plan = ActivationPlan.agoq(min_numel=1024)
    stages, ctx = [], None
    for k in range(chunks):
        sid = rank + world * k
        stage = PipelineStage(LlamaStage(full, sid, n_stages), sid, n_stages, torch.device("cpu"))
        ctx = quantize_stage(stage, cls, MB, plan, stage_aware=aware, context=ctx)
        stages.append(stage)
    sched = cls(stages if chunks > 1 else stages[0], n_microbatches=MB, loss_fn=_loss)
    batch = sample(text_tokens(), BATCH, SEQ, torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    args = (x,) if first else ()
    sched.step(*args, target=y if last else None)
    dist.barrier()
    bits = sorted({a.bits for a in ctx.plan.kinds.values() if hasattr(a, "bits")}) or [16]
    return {"peak": ctx.report.peak_bytes, "bits": bits[0]}


def main() -> None:
    """Measure and write the pipeline section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    U = (BATCH // MB) * SEQ * 128 * 2
    rows = []
    for schedule, layers in (("1f1b", 4), ("interleaved1f1b", 8)):
        res = {a: run_ranks(_rank, 4, schedule, a, layers, timeout=300) for a in (False, True)}
        line = [schedule, "/".join(str(r["bits"]) for r in res[True])]
        for aware in (False, True):
            peaks = [r["peak"] for r in res[aware]]
            line += [
                " / ".join(f"{p / U:.1f}" for p in peaks),
                f"**{max(peaks) / min(peaks):.2f}**",
            ]
        rows.append(line)
        print(line, flush=True)
    body = "\n".join(
        [
            f"Run {today()} on {machine()}. Command: `python benchmarks/pipeline.py`.\n",
            "4 gloo ranks, 8 micro-batches of 1 x 128 tokens (stdlib docstrings), reference LLaMA "
            "dim 128 (1 layer per stage), paper plan. Peak = most bytes agoq held at once on the "
            "rank during the schedule, in U = micro-batch tokens x dim x 2 bytes:\n",
            table(
                [
                    "schedule",
                    "stage bits",
                    "uniform 4-bit peaks (U)",
                    "max/min",
                    "stage-aware peaks (U)",
                    "max/min",
                ],
                rows,
            ),
            "\nGoal: max/min <= 1.25 with stage-aware bits (the paper's interleaved schedule: "
            "about 2.2 without). Bits alone cannot close the gap where a rank's kept attention "
            "internals (16-bit under the paper plan) already dominate, or where the last rank "
            "holds one micro-batch (1F1B): even at 16 bits it stays below rank 0.\n",
        ]
    )
    if not args.no_write:
        write_section("pipeline", "## Pipeline stages\n\n" + body)
        print("wrote docs/benchmarks.md (section pipeline)")


if __name__ == "__main__":
    main()
