"""Python cost of the activation context: per saved tensor, per op, per module call.

    python benchmarks/activation_hooks.py [--no-write] [--quick]

Measured side by side in one run, on tiny tensors so that the kernels cost little and what
is left is agoq's Python (the pack/unpack hooks, the recipe mode, the module hooks):

* **per saved tensor, kept**: a chain of ``torch.sin`` on a 64-element tensor (each op saves
  its input; below ``min_numel``, so it is kept), paper plan vs no context.
* **per saved tensor, quantized**: the same chain on 256 elements with every save stored in
  int8 (``min_numel=0``); the codec's own time (quantize + dequantize of one such tensor,
  timed alone in the same run) is subtracted, leaving the Python around it.
* **per op that saves nothing** (``x + 1``, grad enabled): what the recipe mode costs
  every op, paper plan (recompute on) vs no context.
* **per module call outside any context**, after a context was entered and left, next to
  the same call while a do-nothing global module hook is registered (what a process paid
  for the rest of its life once agoq's hooks stayed installed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from _report import machine, table, today, write_section
from agoq import ActivationPlan, QuantSpec, quantize_activations

K = 400  # ops per chain: large enough that the per-step fixed costs vanish in the division


class SinChain(nn.Module):
    """``K`` unary ops in one module: each saves its input for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for _ in range(K):
            x = torch.sin(x)
        return x


class AddChain(nn.Module):
    """``K`` additions: grad-enabled ops that save nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for _ in range(K):
            x = x + 1.0
        return x


class Tiny(nn.Module):
    """A module call with almost nothing inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x


class ModuleChain(nn.Module):
    """``K`` tiny module calls."""

    def __init__(self) -> None:
        super().__init__()
        self.mods = nn.ModuleList(Tiny() for _ in range(K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for m in self.mods:
            x = m(x)
        return x


def _step(model: nn.Module, x: torch.Tensor, ctx: object | None) -> Callable[[], None]:
    def run() -> None:
        if ctx is None:
            y = model(x)
        else:
            with ctx:  # type: ignore[attr-defined]
                y = model(x)
        y.sum().backward()

    return run


def medians(fns: dict[str, Callable[[], object]], reps: int, rounds: int) -> dict[str, float]:
    """Median CPU seconds of this thread per call, interleaved. CPU time, not wall time:
    on a shared machine the time spent descheduled is not agoq's."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(reps):
                fn()
            times[name].append((time.thread_time() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


class _IdentityHooks:
    """The cheapest Python saved-tensor hook pair (returns the tensor): the floor any
    Python pack/unpack pays, agoq or not."""

    def __enter__(self) -> None:
        self._h = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        self._h.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._h.__exit__(*exc)


def _stub_codec_step(
    model: nn.Module, x: torch.Tensor, ctx: object, probe: torch.Tensor, spec: QuantSpec
) -> Callable[[], None]:
    """A step in which the context's codec calls return a ready-made result at once (pack
    and, in backward, unpack), so what is left of the quantized path is agoq's Python."""
    from agoq.activations import context, store
    from agoq.quant import quantize

    packed = quantize(probe, spec)
    inner = _step(model, x, ctx)

    def run() -> None:
        saved = (context.quantize, store.dequantize)
        context.quantize = lambda t, spec: packed
        store.dequantize = lambda p: probe
        try:
            inner()
        finally:
            context.quantize, store.dequantize = saved

    return run


def main() -> None:
    """Measure and write the activation-hooks section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 3
    torch.set_num_threads(1)  # tiny tensors: threads only add noise

    chain = ModuleChain()
    xm = torch.randn(8, requires_grad=True)
    paper = ActivationPlan.agoq()
    spec = QuantSpec(bits=8, format="int")
    int8 = ActivationPlan.uniform(spec, include_other=True, min_numel=0)
    sin, add = SinChain(), AddChain()
    x64 = torch.randn(64, requires_grad=True)
    x256 = torch.randn(256, requires_grad=True)
    probe = torch.randn(256)

    def codec() -> None:
        from agoq.quant import dequantize, quantize

        for _ in range(K):
            dequantize(quantize(probe, spec))

    t = medians(
        {
            "sin plain": _step(sin, x64, None),
            "sin identity": _step(sin, x64, _IdentityHooks()),
            "sin kept": _step(sin, x64, quantize_activations(paper)),
            "sin256 plain": _step(sin, x256, None),
            "sin256 stub": _stub_codec_step(sin, x256, quantize_activations(int8), probe, spec),
            "sin256 int8": _step(sin, x256, quantize_activations(int8)),
            "codec": codec,
            "add plain": _step(add, x64, None),
            "add paper": _step(add, x64, quantize_activations(paper)),
            "modules plain": _step(chain, xm, None),
            "modules in ctx": _step(chain, xm, quantize_activations(paper)),
        },
        1,
        args.rounds,
    )
    from torch.nn.modules import module as nn_module

    def with_global_hook() -> None:
        handle = nn_module.register_module_forward_pre_hook(lambda m, a: None)
        try:
            for _ in range(20):
                chain(xm)
        finally:
            handle.remove()

    m = medians(
        {"after exit": lambda: [chain(xm) for _ in range(20)], "hooked": with_global_hook},
        1,
        args.rounds,
    )
    after, hooked = m["after exit"] / 20, m["hooked"] / 20

    us = 1e6 / K

    def added(name: str, base: str) -> str:
        return f"+{(t[name] - t[base]) * us:.1f}"

    codec_us = t["codec"] * us
    rows = [
        [
            "saved tensor, any Python hook pair (identity: the floor)",
            f"{t['sin plain'] * us:.1f}",
            added("sin identity", "sin plain"),
        ],
        [
            "saved tensor, kept (paper plan, 64 elements)",
            f"{t['sin plain'] * us:.1f}",
            f"**{added('sin kept', 'sin plain')}**",
        ],
        [
            "saved tensor, int8 (256 el.), codec stubbed out: agoq's Python",
            f"{t['sin256 plain'] * us:.1f}",
            f"**{added('sin256 stub', 'sin256 plain')}**",
        ],
        [
            "saved tensor, int8 (256 el.), real codec",
            f"{t['sin256 plain'] * us:.1f}",
            f"{added('sin256 int8', 'sin256 plain')} (codec alone: {codec_us:.1f})",
        ],
        [
            "grad-enabled op saving nothing (`x + 1`, recipe mode on)",
            f"{t['add plain'] * us:.1f}",
            f"**{added('add paper', 'add plain')}**",
        ],
        [
            "module call inside the context (forward + backward)",
            f"{t['modules plain'] * us:.1f}",
            added("modules in ctx", "modules plain"),
        ],
        [
            "module call outside, after a context exited (forward)",
            f"{hooked * us:.2f} with a no-op global module hook",
            f"**{after * us:.2f}** ({after / hooked:.2f}x of the hooked call)",
        ],
    ]
    for r in rows:
        print(r)
    body = [
        f"Run {today()} on {machine()}. Command: `python benchmarks/activation_hooks.py`.\n",
        f"Python cost of `quantize_activations`, in microseconds per item: chains of {K} "
        "items on tiny tensors so the kernels cost little, one thread, forward + backward, "
        f"CPU time of the thread (time descheduled on a shared machine is not counted), median "
        f"of {args.rounds} interleaved rounds. Before issue 11's changes (this script on "
        "commit 4c6ede9, same machine, a quiet moment of the same day): any Python hook pair "
        "+1.5, kept save +42.7, quantized save with the codec stubbed out +32.9, op saving "
        "nothing +4.4, module call inside the context 10.5 in all, module call after a "
        "context exited 0.94x of the hooked call (the global hooks stayed installed for the "
        "rest of the process). Figures move by tens of percent with the machine's load.\n",
        table(["item", "without agoq, µs", "agoq adds, µs"], rows),
    ]
    if not args.no_write:
        write_section("activation_hooks", "## Activation hooks: Python cost\n\n" + "\n".join(body))
        print("wrote docs/benchmarks.md (section activation_hooks)")


if __name__ == "__main__":
    main()
