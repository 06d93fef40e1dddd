"""What a user would pick instead of agoq to save activation memory: memory and step time side by side.

    python benchmarks/alternatives.py [--no-write] [--quick] [--dim 1024]

On the reference LLaMA (2 layers, fp32, batch 1 x seq 128 of text, one thread), every
method is run on the same model, in one process, timed interleaved (median):

eager
  * no saving (baseline);
  * agoq, the paper plan (fp4 blocks of 128 + recompute of cheap GEMM inputs);
  * full activation checkpointing of every block (``torch.utils.checkpoint``, non-reentrant);
  * selective checkpointing (``create_selective_checkpoint_contexts``): GEMM and attention
    outputs saved, everything else (norms, RoPE, SiLU, products) recomputed;
  * ``torch.autograd.graph.save_on_cpu``.

compiled (every block ``torch.compile``d, inductor, fullgraph)
  * no saving; agoq; full and selective checkpointing as above;
  * inductor's own compile-time activation quantization: the post-grad option
    ``activation_quantization_aten_pass`` of ``torch._inductor.config.post_grad_fusion_options``
    (fp8 e5m2 with a per-tensor scale, torch's default quant type; applied to fp32 and
    bf16 saved values of any size).

Memory, for every method the same way: resident bytes held between forward and backward,
and the step's peak over its start, read from a child process (``_act_memory.py``).
Gradient error: ||g - g_ref|| / ||g_ref|| over all parameters, against the eager baseline.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _act_memory import CHILD_FLAG, child_output, measure_step, mib, paired, run_child
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from _report import machine, table, today, write_section
from agoq import ActivationPlan, quantize_activations
from agoq.data import VOCAB_SIZE, sample, text_tokens
from agoq.models.llama import LlamaConfig, build

N_LAYERS = 2
FP8_OPTIONS = {
    "activation_quantization_aten_pass": {
        "quant_type": "torch.float8_e5m2",
        "allowed_dtypes": "torch.float32;torch.bfloat16",
        "size_in_mb": 0.0,
        "use_scaling": True,
    }
}

_aten = torch.ops.aten
# What the selective policy keeps: the GEMMs and attention (torchtitan's "op" list).
SAC_SAVE = [
    _aten.mm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
]


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))


class Checkpointed(torch.nn.Module):
    """A block run under activation checkpointing (torchtitan's wrapper, in short): the
    block's forward is recomputed in backward, fully or as the selective policy says."""

    def __init__(self, block: torch.nn.Module, selective: bool) -> None:
        super().__init__()
        self.block = block
        self.selective = selective

    def forward(self, *args: torch.Tensor) -> torch.Tensor:  # noqa: D102
        kw: dict = {"use_reentrant": False}
        if self.selective:
            kw["context_fn"] = functools.partial(create_selective_checkpoint_contexts, SAC_SAVE)
        return checkpoint(self.block, *args, **kw)


def checkpointed(model: torch.nn.Module, selective: bool) -> torch.nn.Module:
    """``model`` with every block wrapped in :class:`Checkpointed`."""
    for name in list(model.layers):
        model.layers[name] = Checkpointed(model.layers[name], selective)
    return model


def compiled(model: torch.nn.Module, tag: str) -> torch.nn.Module:
    """``model`` with every block compiled. Each variant's blocks get a class of their own,
    so that dynamo does not hand one variant's compiled graph (compiled under another
    inductor configuration) to another: blocks of one class share compiled code."""
    for layer in model.layers.values():
        layer.__class__ = type(f"{type(layer).__name__}_{tag}", (type(layer),), {})
        layer.compile(backend="inductor", fullgraph=True)
    return model


class _Fp8Compile:
    """Inside: inductor compiles with its fp8 activation quantization pass."""

    def __enter__(self) -> None:
        self._patch = torch._inductor.config.patch(post_grad_fusion_options=FP8_OPTIONS)
        self._patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._patch.__exit__(*exc)


Method = tuple[torch.nn.Module, Callable[[], torch.Tensor]]


def methods(dim: int, batch: torch.Tensor) -> dict[str, Method]:
    """(model, forward returning the loss) of every method, by row label."""
    cfg = LlamaConfig(
        dim=dim, n_layers=N_LAYERS, n_heads=dim // 64, vocab_size=VOCAB_SIZE, max_seq_len=512
    )
    torch.manual_seed(0)
    base = build(cfg)

    def plain(model: torch.nn.Module, ctx: object | None = None) -> Method:
        def run() -> torch.Tensor:
            if ctx is None:
                return loss_fn(model, batch)
            with ctx:  # type: ignore[attr-defined]
                return loss_fn(model, batch)

        return model, run

    agoq_ctx = quantize_activations(ActivationPlan.agoq())
    c_base = compiled(copy.deepcopy(base), "base")
    c_fp8 = compiled(copy.deepcopy(base), "fp8")
    return {
        "eager: no saving": plain(base),
        "eager: agoq (paper plan)": plain(base, agoq_ctx),
        "eager: full checkpointing": plain(checkpointed(copy.deepcopy(base), False)),
        "eager: selective checkpointing": plain(checkpointed(copy.deepcopy(base), True)),
        "eager: save_on_cpu": plain(base, torch.autograd.graph.save_on_cpu()),
        "compiled: no saving": plain(c_base),
        "compiled: agoq (paper plan)": plain(c_base, agoq_ctx),
        "compiled: full checkpointing": plain(
            compiled(checkpointed(copy.deepcopy(base), False), "ac")
        ),
        "compiled: selective checkpointing": plain(
            compiled(checkpointed(copy.deepcopy(base), True), "sac")
        ),
        "compiled: inductor fp8 activation quantization": plain(c_fp8, _Fp8Compile()),
    }


def warm(fwd: dict[str, Method]) -> dict[str, list[torch.Tensor]]:
    """Two steps of every method (the first compiles); the gradients of the first."""
    grads = {}
    for name, (model, f) in fwd.items():
        model.zero_grad(set_to_none=True)
        f().backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        f().backward()
    return grads


def memory_child(args: list[str]) -> None:
    """In the child process: (held, peak) bytes of every method."""
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64
    dim = int(args[0])
    batch = sample(text_tokens(), int(args[1]), int(args[2]) + 1, torch.Generator().manual_seed(0))
    fwd = methods(dim, batch)
    warm(fwd)
    child_output({name: measure_step(f) for name, (_, f) in fwd.items()})


def main() -> None:
    """Measure every method and write the alternatives section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="dim 256, 2 reps (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.dim, args.reps = 256, 2
    torch.set_num_threads(1)  # see activation_width.py: a shared machine times neighbours
    torch._dynamo.config.recompile_limit = 64
    t_start = time.perf_counter()
    mem = run_child(__file__, [str(args.dim), str(args.batch), str(args.seq)])
    batch = sample(text_tokens(), args.batch, args.seq + 1, torch.Generator().manual_seed(0))
    fwd = methods(args.dim, batch)
    grads = warm(fwd)
    ref = grads["eager: no saving"]
    times: dict[str, list[float]] = {k: [] for k in fwd}
    walls: dict[str, list[float]] = {k: [] for k in fwd}
    for _ in range(args.reps):
        for name, (_, f) in fwd.items():
            t0, w0 = time.thread_time(), time.perf_counter()
            f().backward()
            times[name].append(time.thread_time() - t0)
            walls[name].append(time.perf_counter() - w0)
    med = {k: statistics.median(v) for k, v in times.items()}

    def base_of(name: str) -> str:
        return f"{name.split(':')[0]}: no saving"

    # Per-round ratios to the same mode's baseline (run in the same round): drift cancels.
    rel = {k: paired(times[k], times[base_of(k)]) for k in fwd}
    wall_rel = {k: paired(walls[k], walls[base_of(k)])[0] for k in fwd}

    def err(g: list[torch.Tensor]) -> float:
        num = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(g, ref, strict=True))
        den = sum((b.double() ** 2).sum() for b in ref)
        return float((num / den) ** 0.5)

    rows = []
    for name in fwd:
        mode = name.split(":")[0]
        base = f"{mode}: no saving"
        held, peak = mem[name]
        rows.append(
            [
                name,
                f"**{mib(held)}** ({held / mem[base][0]:.2f}x)",
                f"{mib(peak)} ({peak / mem[base][1]:.2f}x)",
                f"{med[name] * 1e3:.0f} (**{rel[name][0]:.2f}x**, "
                f"{rel[name][1]:.2f}-{rel[name][2]:.2f})",
                f"{wall_rel[name]:.2f}x",
                f"{err(grads[name]):.1e}",
            ]
        )
        print(rows[-1], flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")

    def held(name: str) -> str:
        return f"{mib(mem[name][0])} MiB"

    def ratio(name: str) -> str:
        return f"{rel[name][0]:.2f}x"

    ea, ef, es = (
        "eager: agoq (paper plan)",
        "eager: full checkpointing",
        "eager: selective checkpointing",
    )
    ca, c8 = "compiled: agoq (paper plan)", "compiled: inductor fp8 activation quantization"
    cf = "compiled: full checkpointing"
    eager_peaks = {k: v[1] for k, v in mem.items() if k.startswith("eager")}
    lowest_peak = min(eager_peaks, key=eager_peaks.get)
    peak_txt = (
        f"and the lowest step peak of the eager methods ({mib(mem[ea][1])} MiB: no recompute "
        "burst in backward)"
        if lowest_peak == ea
        else f"and a step peak of {mib(mem[ea][1])} MiB (lowest: {lowest_peak}, "
        f"{mib(mem[lowest_peak][1])} MiB)"
    )
    sac_txt = "more" if mem[es][0] > mem[ea][0] else "less"
    reading = (
        "**Reading.** Full checkpointing holds the least "
        f"({held(ef)} eager, exact gradients) but pays a recomputed forward ({ratio(ef)} eager, "
        f"{ratio(cf)} compiled); agoq holds {held(ea)} ({ratio(ea)} eager, {ratio(ca)} "
        f"compiled) at a gradient error of {err(grads[ea]):.1e}, {peak_txt}. "
        f"Selective checkpointing (GEMM and attention outputs kept) holds {held(es)}, "
        f"{sac_txt} than agoq, at {ratio(es)}. Inductor's fp8 pass holds {held(c8)} "
        f"({ratio(c8)}, error {err(grads[c8]):.1e}) against agoq's {held(ca)} compiled: under "
        "compile agoq does not recompute (the partitioner decides what is saved); agoq keeps "
        "attention at full precision where the fp8 pass quantizes everything, and agoq also "
        "runs eager, the fp8 pass only compiled. `save_on_cpu` saves nothing on a CPU-only "
        "machine (the device is the host: the held bytes are the host copies); on a GPU it "
        "moves the saved tensors to host memory at the cost of PCIe copies, which this run "
        "cannot show. Where agoq does not win: it is not exact (checkpointing is), and full "
        f"checkpointing holds {mem[ef][0] / mem[ea][0]:.2f}x of agoq's bytes. The two "
        "compose: under checkpointing agoq stores what the checkpoint keeps (the block "
        "inputs) in the plan's format.\n"
    )

    body = [
        f"Run {today()} on {machine()}. Command: `python benchmarks/alternatives.py`.\n",
        f"Reference LLaMA, dim {args.dim}, {N_LAYERS} layers, head dim 64, fp32, batch "
        f"{args.batch} x seq {args.seq} of text, one thread; step = forward + backward, median "
        f"of {args.reps} interleaved steps, CPU time of the compute thread (time spent "
        "descheduled by the neighbours on this shared machine is not counted; the wall-clock "
        "ratio is shown next to it); ratio to no saving in the same mode = median of the "
        "per-round ratios (both run back to back in each round), with their quartiles. Memory is "
        "measured the same way for every method (resident bytes held between forward and "
        "backward, and the step's peak over its start, in a child process whose malloc maps "
        "every block >= 4 KiB: see `benchmarks/_act_memory.py`); gradient error = "
        "||g - g_ref|| / ||g_ref|| over all parameters against eager without saving. "
        "Selective checkpointing saves the GEMM and attention outputs (torchtitan's op list) "
        "and recomputes the rest; inductor's fp8 pass is `post_grad_fusion_options="
        "{'activation_quantization_aten_pass': {...}}` with fp8 e5m2, per-tensor scaling, "
        "fp32 allowed, no size threshold.\n",
        table(
            [
                "method",
                "held for backward, MiB",
                "step peak, MiB",
                "step, CPU ms",
                "step, wall clock",
                "grad error",
            ],
            rows,
        ),
        "\n" + reading,
    ]
    if not args.no_write:
        write_section("alternatives", "## Alternatives to agoq\n\n" + "\n".join(body))
        print("wrote docs/benchmarks.md (section alternatives)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        memory_child(sys.argv[2:])
    else:
        main()
