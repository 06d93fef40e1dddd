"""Saved-activation memory and gradient fidelity of the activation plans.

    python benchmarks/activations.py [--no-write] [--quick]

On the reference LLaMA (MHA, SwiGLU hidden = 4 x dim as in the paper's Table 1):

1. Stored bytes per layer in U (U = batch x seq x dim x 2 bytes, bf16 model) for the
   baseline (no agoq: an independent pass-through hook counts what autograd keeps), uniform
   int8, uniform 4-bit, the paper's plan without and with recompute, and with 8-bit
   attention internals; cross-checked with torch's MemTracker (activation bytes held after
   the forward); and what compiled blocks hold (partitioned as inductor does).
2. Gradient fidelity (the paper's Table 13): after training an fp32 copy briefly on real
   text (stdlib docstrings), the normalised L2 error of each weight gradient vs unquantized.
3. Per-stage peak stored bytes for 4-stage 1F1B and Interleaved1F1B, with and without
   stage-aware bits, from the measured per-layer bytes at each bit width.

Step times live in ``activation_width.py`` (overhead against width, eager and compiled)
and ``alternatives.py`` (against checkpointing, inductor's fp8 pass, save_on_cpu): on this
CPU bf16 GEMMs run at 0.3 GFLOP/s, so a bf16 step time here would time the GEMM fallback.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _act_memory import SavedCounter
from torch.distributed._tools.mem_tracker import MemTracker

from _report import machine, table, today, write_section
from agoq import ActivationPlan, QuantSpec, quantize_activations
from agoq.data import VOCAB_SIZE, sample, split, text_tokens
from agoq.memory import compiled_saved_bytes
from agoq.models.llama import LlamaConfig, build
from agoq.pipeline import inflight_microbatches, stage_bits

CFG = LlamaConfig(
    dim=256, n_layers=4, n_heads=8, vocab_size=VOCAB_SIZE, hidden_dim=1024, max_seq_len=512
)
INT8 = QuantSpec(bits=8, format="int")
FP4 = QuantSpec(bits=4, format="fp4_e2m1")


def plans() -> dict[str, ActivationPlan | None]:
    """The plans compared, by row label (None = no agoq at all)."""
    base = ActivationPlan.agoq()
    return {
        "baseline (no agoq)": None,
        "uniform int8": ActivationPlan.uniform(INT8),
        "uniform 4-bit (fp4, attention too)": ActivationPlan.uniform(FP4),
        "paper plan, no recompute": ActivationPlan.agoq(recompute=False),
        "paper plan + recompute": base,
        "paper plan + recompute, attention int8": ActivationPlan(
            kinds={**base.kinds, "attn_internals": INT8}, recompute=True, fallback=base.fallback
        ),
    }


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))


def forward_bytes(model, batch, plan) -> dict:
    """Stored bytes (per layer and total) of one forward, and MemTracker's view."""
    mt = MemTracker()
    mt.track_external(model)
    out = {}
    with mt:
        if plan is None:
            counter = SavedCounter()
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                loss = loss_fn(model, batch)
            out["total"] = counter.bytes
            out["layers"] = None
        else:
            with quantize_activations(plan) as ctx:
                loss = loss_fn(model, batch)
            rep = ctx.report
            out["total"] = rep.stored_bytes
            out["layers"] = [rep.total(f"layers.{i}.").stored_bytes for i in range(CFG.n_layers)]
        snap = mt.get_tracker_snapshot()
    acts = sum(v for k, v in snap[torch.device("cpu")].items() if "ACT" in str(k))
    out["tracker"] = acts
    del loss
    return out


def baseline_layer_bytes(model, batch) -> list[int]:
    """Per-layer baseline bytes: agoq's report with a keep-everything plan."""
    with quantize_activations(ActivationPlan.keep_all()) as ctx:
        loss_fn(model, batch)
    return [ctx.report.total(f"layers.{i}.").stored_bytes for i in range(CFG.n_layers)]


def compiled_model(seed_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``seed_model`` with each transformer block compiled (fullgraph), the way
    torchtitan compiles; agoq's hooks are inlined into each block's graphs. The backend is
    ``aot_eager_decomp_partition``: inductor's decompositions and min-cut partitioner, which
    decide what is saved for backward, without inductor's code generation (which would cost
    tens of seconds per plan and changes no saved tensor)."""
    import copy

    model = copy.deepcopy(seed_model)
    for layer in model.layers.values():
        layer.compile(backend="aot_eager_decomp_partition", fullgraph=True)
    return model


def compiled_layer_bytes(model, batch, plan) -> float:
    """Mean bytes one compiled block holds for backward (parameters excluded)."""
    if plan is None:
        loss = loss_fn(model, batch)
    else:
        with quantize_activations(plan):
            loss = loss_fn(model, batch)
    total = compiled_saved_bytes(loss, model)
    loss.backward()
    return total / CFG.n_layers


def train_briefly(steps: int, batch: int, seq: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """An fp32 model trained ``steps`` steps on the text corpus, and a held-out batch."""
    torch.manual_seed(0)
    model = build(CFG)
    train, held = split(text_tokens())
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, sample(train, batch, seq, gen)).backward()
        opt.step()
    return model, sample(held, batch, seq, torch.Generator().manual_seed(1))


def fidelity(model, batch, plan) -> dict[str, float]:
    """Normalised L2 error of each weight gradient vs the unquantized gradient."""
    model.zero_grad()
    loss_fn(model, batch).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with quantize_activations(plan):
        loss = loss_fn(model, batch)
    loss.backward()
    return {
        n: ((p.grad - ref[n]).norm() / ref[n].norm()).item() for n, p in model.named_parameters()
    }


def group(name: str) -> str:
    """Parameter name without the layer index (layers.3.attention.wq.weight -> attention.wq)."""
    parts = name.split(".")
    if parts[0] == "layers":
        parts = parts[2:]
    return ".".join(p for p in parts if p != "weight")


def main() -> None:
    """Run all four measurements and write the activations section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="fewer training steps (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.train_steps = 10
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads time the neighbours

    U = args.batch * args.seq * CFG.dim * 2
    torch.manual_seed(0)
    model = build(CFG).bfloat16()
    batch = sample(text_tokens(), args.batch, args.seq, torch.Generator().manual_seed(0))
    out_bytes = args.batch * args.seq * CFG.vocab_size * 2  # logits, alive after forward

    rows = []
    base_layers = baseline_layer_bytes(model, batch)
    torch._dynamo.config.recompile_limit = 64  # one compile per distinct plan
    cmodel = compiled_model(model)
    for label, plan in plans().items():
        fb = forward_bytes(model, batch, plan)
        layers = fb["layers"] or base_layers
        per_layer_u = statistics.mean(layers) / U
        compiled_u = compiled_layer_bytes(cmodel, batch, plan) / U
        rows.append(
            [
                label,
                f"**{per_layer_u:.2f}U**",
                f"{fb['total'] / 2**20:.2f}",
                f"{(fb['tracker'] - out_bytes) / 2**20:.2f}",
                f"**{compiled_u:.2f}U**",
            ]
        )
        print(rows[-1], flush=True)

    # Gradient fidelity on real text.
    fmodel, held = train_briefly(args.train_steps, 4, 128)
    fid_rows, summary = [], []
    base = ActivationPlan.agoq()
    fid_plans = {
        "paper plan (fp4)": base,
        "paper plan, int5": ActivationPlan.agoq(bits=5, format="int"),
        "paper plan, int6": ActivationPlan.agoq(bits=6, format="int"),
        "paper plan, norm inputs int8": ActivationPlan(
            kinds={**base.kinds, "norm_input": INT8, "embedding_output": INT8},
            fallback=base.fallback,
        ),
        "uniform int8 (attention too)": ActivationPlan.uniform(INT8),
        "uniform 4-bit (attention too)": ActivationPlan.uniform(FP4),
    }
    errs = {k: fidelity(fmodel, held, p) for k, p in fid_plans.items()}
    groups = sorted({group(n) for n in errs["paper plan (fp4)"]})
    for g in groups:
        fid_rows.append(
            [g]
            + [
                f"{statistics.mean(v for n, v in e.items() if group(n) == g):.4f}"
                for e in errs.values()
            ]
        )
    for k, e in errs.items():
        w = [v for n, v in e.items() if "layers." in n and "norm" not in n]
        summary.append(f"{k}: mean {statistics.mean(w):.4f}, max {max(w):.4f}")
        print(k, summary[-1])

    # Pipeline stages: per-layer bytes at each width, then peaks per schedule.
    per_bits = {}
    for b in (4, 5, 6, 8, 16):
        with quantize_activations(ActivationPlan.agoq().with_bits(4, b)) as ctx:
            loss_fn(model, batch)
        per_bits[b] = statistics.mean(
            ctx.report.total(f"layers.{i}.").stored_bytes for i in range(CFG.n_layers)
        )
    stage_rows = []
    for name, kw in [("1F1B", {}), ("Interleaved1F1B (v=2)", {"stages_per_rank": 2})]:
        sched = "1f1b" if name == "1F1B" else "interleaved1f1b"
        n = inflight_microbatches(sched, 4, 8, **kw)
        bits = stage_bits(n)
        uni = [ni * per_bits[4] for ni in n]
        aware = [ni * per_bits[b] for ni, b in zip(n, bits, strict=True)]
        stage_rows.append(
            [
                name,
                "/".join(map(str, n)),
                "/".join(map(str, bits)),
                " / ".join(f"{x / U:.1f}" for x in uni),
                f"{max(uni) / min(uni):.2f}",
                " / ".join(f"{x / U:.1f}" for x in aware),
                f"**{max(aware) / min(aware):.2f}**",
            ]
        )
        print(stage_rows[-1])

    body = [
        f"Run {today()} on {machine()}. Command: `python benchmarks/activations.py`.\n",
        f"Model: reference LLaMA, dim {CFG.dim}, {CFG.n_layers} layers, {CFG.n_heads} heads (MHA), "
        f"SwiGLU hidden {CFG.hidden_dim} (4 x dim, the paper's Table 1 assumption), bf16; batch "
        f"{args.batch} x seq {args.seq} of stdlib-docstring text; U = {U / 2**20:.2f} MiB. "
        "Eager, and with each block `torch.compile`d (fullgraph, the context entered outside: "
        "agoq's hooks are inlined into the block graphs; backend `aot_eager_decomp_partition`, "
        "i.e. inductor's decompositions and min-cut partitioner, which decide what is saved, "
        "without its code generation; compiled bytes are what the compiled blocks hold for "
        "backward, read from their autograd nodes). Step times: see the activation-width and "
        "alternatives sections (fp32: this CPU's bf16 GEMMs run at 0.3 GFLOP/s).\n",
        "**Stored activations** (per-layer = mean over the 4 transformer layers; "
        "total includes the embedding, final norm, LM head and the loss's saved logits; tracker = "
        "MemTracker's activation bytes after the eager forward minus the logits output; under "
        "compile the partitioner chooses what to save and recomputes cheap ops itself, and "
        "agoq's recipes are not used):\n",
        table(
            [
                "plan",
                "per layer, eager",
                "total MiB (exact)",
                "MemTracker MiB",
                "per layer, compiled",
            ],
            rows,
        ),
        "\nPaper's Table 1: 28U (Megatron bf16) -> 7.75U (AGoQ). Goal here: <= 7.75U with the paper "
        "plan + recompute, <= 6.5U with 8-bit attention internals.\n",
        f"**Gradient fidelity** (normalised L2 error ||g_q - g|| / ||g|| of weight gradients, fp32 "
        f"model trained {args.train_steps} steps (batch 4 x 128) on the corpus, held-out batch 8 x 128; mean over "
        "layers). Goal <= 0.05 for the paper plan (its Table 13: 0.026 for GEMM weights):\n",
        table(["weight", *fid_plans], fid_rows),
        "\nGEMM weights of the transformer layers: " + "; ".join(summary) + ".\n",
        "**Pipeline stages** (4 ranks, 8 micro-batches; per-rank peak = in-flight micro-batch "
        "count from torch's schedule x measured per-layer bytes at the rank's bits, in U per "
        "layer of stage):\n",
        table(
            [
                "schedule",
                "in flight",
                "stage bits",
                "uniform 4-bit peaks",
                "max/min",
                "stage-aware peaks",
                "max/min",
            ],
            stage_rows,
        ),
    ]
    if not args.no_write:
        write_section("activations", "## Activations\n\n" + "\n".join(body))
        print("wrote docs/benchmarks.md (section activations)")


if __name__ == "__main__":
    main()
