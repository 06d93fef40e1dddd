"""What agoq installs on each torchtitan model part, for every torchtitan version.

The version adapters (:mod:`torchtitan_ext.converter` for 0.2.2, :mod:`torchtitan_ext.v03`
for 0.3) only translate their torchtitan's config and lifecycle into a :class:`Setup` and
calls of :class:`AgoqRuntime`; what happens on a model part is written once, here:

- ``install(part)``: the activation context (``quantize_activations(plan)``, under pipeline
  parallelism ``plan.for_stage(...)``), the gradient hook (DDP: ``Int8AllReduceState`` +
  ``int8_allreduce``; FSDP2/HSDP: ``install_int8_reduce_scatter``), the 8-bit gradient
  store, the numerics guard.
- ``call(part, ...)``: every call of the part; training forwards run inside the context,
  the store folds and restores gradients around them, the guard captures a due step.
- ``post_optimizer(parts)``: after every optimizer step, the store check, the guard's
  activation check, the memory report in the log.

Imports neither torchtitan nor any torchtitan version's modules.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import agoq
from agoq.memory import compiled_saved_bytes

from .config import Agoq

logger = logging.getLogger("torchtitan_ext")
AC_BLOCK_PATTERN = r"(?:^|\.)layers\.\d+$"


@dataclass
class Setup:
    """What the runtime needs to know of a run, read by a version adapter from its
    torchtitan's config and ``ParallelDims``."""

    version: str  # torchtitan version, for messages
    fsdp: bool  # FSDP2 (or torchtitan 0.3's FSDP-based HSDP) is applied
    dp_replicate: bool
    dp_replicate_degree: int
    tp: bool
    pp: bool
    pp_degree: int
    mesh: Callable[[str], Any]  # ParallelDims.get_mesh
    forwards_per_step: int  # training forwards of one model part per optimizer step
    schedule: str = ""
    schedule_csv: bool = False
    n_microbatches: int = 1
    stages_per_rank: Callable[[], int] = lambda: 1
    compiled: bool = False
    ac_mode: str = "none"  # torchtitan's activation checkpointing, "none" when off
    log_freq: int = 1
    log: logging.Logger = field(default_factory=lambda: logger)
    ddp: bool = True  # replicate-only data parallelism is DDP (0.2.2's replicate())


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


class AgoqCall:
    """Put in front of the model's class by the converters (the way ``fully_shard``
    re-classes modules): every call of a model part goes through its runtime. A class
    attribute, so the pipeline split's deepcopies and FSDP's re-classing keep it."""

    _agoq_runtime: AgoqRuntime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = super().__call__  # the model class's own __call__ (FSDP's, nn.Module's)
        return type(self)._agoq_runtime.call(self, call, args, kwargs)


@dataclass
class _Part:
    """What the converter installed on one model part."""

    index: int
    ctx: Any = None  # agoq ActivationContext
    plan_note: str = ""
    ddp_state: Any = None  # agoq Int8AllReduceState
    fsdp_modules: int = 0
    store: Any = None  # agoq Int8GradStore
    store_peak: int = 0
    compiled_bytes: int = 0  # what compiled regions held for backward (report steps)
    comms: list = field(default_factory=list)
    guard: Any = None  # agoq NumericsGuard of this part
    check_activations: bool = False  # the activation check is possible on this part
    capture: Any = None  # _Capture of a due step, checked after its optimizer step

    def materialize_hook(self, grad: torch.Tensor) -> None:
        self.store.materialize()


class _Capture:
    """One micro-batch of a due step: the part's inputs (cloned: pipeline stages reuse their
    receive buffers) and the gradient that backward brings to each of its outputs."""

    def __init__(self, step: int, args: tuple, kwargs: dict, out: Any) -> None:
        self.step = step
        self.args = tuple(_clone(a) for a in args)
        self.kwargs = {k: _clone(v) for k, v in kwargs.items()}
        outs = _tensors(out)
        self.grads: list[torch.Tensor | None] = [None] * len(outs)
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(lambda g, i=i: self._keep(i, g))

    def _keep(self, i: int, grad: torch.Tensor) -> None:
        self.grads[i] = grad.detach().clone()

    def ready(self) -> bool:
        return any(g is not None for g in self.grads)

    def loss_fn(self, module: nn.Module) -> Any:
        """``sum(output * grad)``: its parameter gradient is the vjp of the captured grad."""

        root = _CheckRoot(module)

        def loss() -> torch.Tensor:
            outs = _tensors(root(*self.args, **self.kwargs))
            terms = [(t * g).sum() for t, g in zip(outs, self.grads, strict=True) if g is not None]
            return sum(terms[1:], terms[0])  # outputs may differ in dtype: no stack

        return loss


class _CheckRoot(nn.Module):
    """Runs ``part.forward`` as a child module: the part's own ``__call__`` (replicate()'s
    DDP hooks, the converter's wrapper) is skipped, so a check never prepares DDP's
    reducer, while agoq's context still sees a root module above the part, so its modules
    get the same kinds as in training (FQNs gain a ``part.`` prefix; the kind rules match
    whole FQN segments)."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.part.forward(*args, **kwargs)


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class AgoqRuntime:
    """agoq on the model parts of one torchtitan run (see the module docstring)."""

    def __init__(self, cfg: Agoq, setup: Setup) -> None:
        if not isinstance(cfg, Agoq):
            raise TypeError(f"[agoq] expected the [agoq] settings (Agoq), got {type(cfg).__name__}")
        self.cfg, self.setup = cfg, setup
        self.plan = cfg.activation_plan()
        if self.plan is not None and setup.ac_mode != "none":
            # Under torchtitan's AC the checkpoint wrapper (which takes the block's place,
            # "layers.<i>") saves only the block input: the residual stream, i.e. what the
            # plan calls norm_input. Without this rule it would be "other" (kept).
            rule = agoq.KindRule("norm_input", AC_BLOCK_PATTERN)
            self.plan = dataclasses.replace(self.plan, rules=(rule, *self.plan.rules))
        if setup.compiled and setup.tp and self.plan is not None:
            # Measured on torch 2.13 (CPU): compiled TP blocks with the activation hooks
            # inlined fail in AOTAutograd's DTensor backward wrapper ("not enough values to
            # unpack"); a clear refusal instead of that error.
            raise ValueError(
                "[agoq] activations under tensor parallelism with torch.compile are not "
                "supported: the compiled backward of DTensor blocks with saved-tensor hooks "
                "inlined fails in AOTAutograd (torch 2.13; torchtitan's TP + compile also "
                'fails on CPU without agoq). Disable compile, or set activations = "off"'
            )
        self.grad_path = self._grad_path()
        self.step = 0
        self.parts: weakref.WeakKeyDictionary[nn.Module, _Part] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------ configuration

    def _grad_path(self) -> str | None:
        s = self.setup
        if self.cfg.grad_bits == 0:
            return None
        if s.fsdp:
            return "hsdp" if s.dp_replicate else "fsdp"
        if s.dp_replicate:
            return "ddp" if s.ddp else None
        return None  # no data parallelism: nothing to reduce

    def _stage_plan(self) -> tuple[Any, str]:
        """This rank's plan under pipeline parallelism, and a note for the log."""
        plan, cfg, s = self.plan, self.cfg, self.setup
        if plan is None or not s.pp or not cfg.stage_aware:
            return plan, ""
        if s.schedule_csv:
            return plan, " (stage-aware bits skipped: CSV pipeline schedule)"
        if cfg.activation_bits not in (4, 5, 6, 8):
            return (
                plan,
                f" (stage-aware bits need activation_bits in 4/5/6/8, not {cfg.activation_bits})",
            )
        rank = s.mesh("pp").get_local_rank()
        spr = s.stages_per_rank()
        try:
            staged = plan.for_stage(
                rank,
                s.pp_degree,
                s.schedule,
                n_microbatches=s.n_microbatches,
                stages_per_rank=spr,
                base_bits=cfg.activation_bits,
            )
        except ValueError as e:
            s.log.warning(
                f"[agoq] stage-aware activation bits unavailable ({e}); using the plan as is"
            )
            return plan, " (stage-aware bits unavailable for this schedule)"
        bits = sorted({a.bits for a in staged.kinds.values() if isinstance(a, agoq.QuantSpec)})
        return staged, (
            f" (stage-aware: pp rank {rank}/{s.pp_degree}, {s.schedule}, "
            f"{s.n_microbatches} micro-batches, {spr} stage(s)/rank -> bits {bits or 'keep'})"
        )

    def announce(self) -> None:
        """Log what the converter will install (once, when it is applied)."""
        cfg, s = self.cfg, self.setup
        acts = "off" if self.plan is None else f"plan {cfg.activations!r}"
        grads = {
            None: "off"
            if cfg.grad_bits == 0
            else "full precision (replicate-only data parallelism is FSDP2's own all-reduce "
            "in this torchtitan; agoq's int8 path is the FSDP2 reduce-scatter: use "
            "data_parallel_shard_degree > 1)"
            if s.dp_replicate
            else "off (no data parallelism)",
            "ddp": "int8 all-reduce DDP comm hook"
            + (" with error feedback" if cfg.error_feedback else ""),
            "fsdp": "int8 FSDP2 reduce-scatter",
            "hsdp": "int8 FSDP2 reduce-scatter over the shard group "
            "(the replicate all-reduce stays full precision)",
        }[self.grad_path]
        s.log.info(
            f"[agoq] converter on (torchtitan {s.version}): activations {acts}, gradients "
            f"{grads}, 8-bit gradient storage {'on' if cfg.grad_storage else 'off'}"
        )
        if self.plan is not None:
            s.log.info("[agoq] activation plan:\n" + self.plan.describe())
        if self.plan is not None and s.ac_mode != "none":
            s.log.warning(
                f"[agoq] activation checkpointing is {s.ac_mode!r}: agoq composes with it and "
                "only stores what checkpointing keeps (the checkpointed regions' inputs); turn "
                "torchtitan's activation checkpointing off to let agoq store every saved "
                "activation instead"
            )
        if cfg.error_feedback and self.grad_path in ("fsdp", "hsdp"):
            s.log.warning("[agoq] error_feedback applies to the DDP path only; ignored under FSDP2")
        if cfg.grad_storage and s.forwards_per_step == 1:
            s.log.warning(
                "[agoq] grad_storage has nothing to hold: one forward per optimizer step (set "
                "training.global_batch_size > local_batch_size x data-parallel degree, or use PP)"
            )

    # ------------------------------------------------------------------ runtime

    def call(self, module: nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """One call of a model part (``call`` is its class's own ``__call__``)."""
        st = self.parts.get(module)
        if st is None:
            st = self.install(module)
        if not (module.training and torch.is_grad_enabled()) or _on_meta(args, kwargs):
            # Evaluation, or a pipeline stage's shape inference on meta tensors: untouched.
            return call(*args, **kwargs)
        if st.store is not None:
            # Gradients of earlier micro-batches go to 8 bits for this forward...
            st.store.accumulate()
            st.store_peak = max(st.store_peak, st.store.nbytes)
        if st.ctx is not None:
            with st.ctx:
                out = call(*args, **kwargs)
        else:
            out = call(*args, **kwargs)
        if st.ctx is not None and self.setup.compiled and self.cfg.report:
            # Compiled blocks run agoq's hooks inlined (no Python per save): count what
            # they hold from the autograd graph instead.
            for t in _tensors(out):
                if t.grad_fn is not None:
                    st.compiled_bytes += compiled_saved_bytes(t, module)
                    break
        if st.check_activations and st.capture is None and st.guard.due(self.step):
            st.capture = _Capture(self.step, args, kwargs, out)
        if st.store is not None:
            # ... and come back when this micro-batch's backward reaches the part's output,
            # before any of its parameter gradients is accumulated.
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(st.materialize_hook)
        return out

    def install(self, module: nn.Module) -> _Part:
        """Install agoq on one fully parallelized model part (idempotent)."""
        if module in self.parts:
            return self.parts[module]
        st = _Part(index=len(self.parts))
        self.parts[module] = st
        cfg, s = self.cfg, self.setup
        plan, st.plan_note = self._stage_plan()
        if plan is not None:
            st.ctx = agoq.quantize_activations(plan)
        if cfg.numerics_check_every:
            st.guard = agoq.NumericsGuard(
                every=cfg.numerics_check_every,
                threshold=cfg.numerics_threshold,
                activation_threshold=cfg.numerics_activation_threshold,
                action=cfg.numerics_action,
                log=lambda line, i=st.index: s.log.info(f"[agoq] part {i}: {line}"),
            )
            self._guard_setup(module, st)
        if self.grad_path == "ddp":
            if not hasattr(module, "register_comm_hook"):
                raise RuntimeError(
                    "[agoq] expected torchtitan's replicate()d model part (DDP) with "
                    f"register_comm_hook, got {type(module).__name__}"
                )
            kw = {"block": cfg.grad_block} if cfg.grad_block else {}
            group = s.mesh("dp_replicate").get_group()
            st.ddp_state = agoq.Int8AllReduceState(
                group, error_feedback=cfg.error_feedback, model=module, guard=st.guard, **kw
            )
            module.register_comm_hook(st.ddp_state, agoq.int8_allreduce)
        elif self.grad_path in ("fsdp", "hsdp"):
            kw = {"block": cfg.grad_block} if cfg.grad_block else {}
            st.fsdp_modules = agoq.install_int8_reduce_scatter(module, **kw)
            st.comms = _reduce_scatter_comms(module)
        if cfg.grad_storage and s.forwards_per_step > 1:
            st.store = agoq.Int8GradStore([p for p in module.parameters() if p.requires_grad])
        s.log.info(
            f"[agoq] model part {st.index} ({type(module).__name__}): activation context "
            f"{'on' + st.plan_note if st.ctx is not None else 'off'}; gradients "
            + (
                f"int8 DDP comm hook on {s.dp_replicate_degree} replicas"
                if st.ddp_state is not None
                else f"int8 reduce-scatter on {st.fsdp_modules} FSDP modules"
                if st.fsdp_modules
                else "unchanged"
            )
            + (f"; 8-bit gradient store over {len(st.store.params)} parameters" if st.store else "")
        )
        return st

    def post_optimizer(self, parts: nn.Module | list[nn.Module]) -> None:
        """After every optimizer step: check the gradient store, run a due activation
        check, log the report."""
        self.step += 1
        parts = parts if isinstance(parts, list) else [parts]
        log = self.cfg.report and (self.step == 1 or self.step % max(1, self.setup.log_freq) == 0)
        for m in parts:
            st = self.parts.get(m)
            if st is None:
                continue
            if st.store is not None and len(st.store):
                raise RuntimeError(
                    f"[agoq] model part {st.index}: {len(st.store)} gradients were still in the "
                    "8-bit store at the optimizer step (a forward whose backward never ran?); "
                    "disable grad_storage"
                )
            if st.capture is not None:
                capture, st.capture = st.capture, None
                self._check_activations(m, st, capture)
            if log:
                self._log(st)
            if st.ctx is not None:
                st.ctx.report.clear()
            st.compiled_bytes = 0

    def _guard_setup(self, module: nn.Module, st: _Part) -> None:
        """Decide which of the guard's checks this part supports, and say so."""
        from torch.distributed.tensor import DTensor

        sharded = self.setup.fsdp or any(isinstance(p, DTensor) for p in module.parameters())
        st.check_activations = not sharded and st.ctx is not None and _quantizes(st.ctx.plan)
        what = [
            *(["activations"] if st.check_activations else []),
            *(["DDP gradient buckets"] if self.grad_path == "ddp" else []),
        ]
        if sharded:
            self.setup.log.warning(
                f"[agoq] part {st.index}: the numerics guard cannot check FSDP2/DTensor "
                "parameters (FSDP's backward hooks would reduce the check's gradients, and "
                "agoq's int8 reduce-scatter has no guard)"
            )
        self.setup.log.info(
            f"[agoq] part {st.index}: numerics guard every {st.guard.every} steps on "
            f"{' and '.join(what) or 'nothing (no quantized activations, no int8 DDP hook)'}"
        )

    def _check_activations(self, module: nn.Module, st: _Part, capture: _Capture) -> None:
        """Run the guard's activation check on the captured micro-batch, if it got its
        output gradient (a forward whose backward never ran is dropped)."""
        if not capture.ready():
            return
        group: Any = "local"  # pipeline ranks hold different parts: nothing to agree on
        if self.setup.dp_replicate:  # replicas agree on every decision
            group = self.setup.mesh("dp_replicate").get_group()
        st.guard.check_activations(
            capture.step, st.ctx, module, capture.loss_fn(module), group=group
        )

    def _log(self, st: _Part) -> None:
        head = f"[agoq] step {self.step} part {st.index}:"
        if st.ctx is not None:
            rep = st.ctx.report
            tot = rep.total()
            ratio = tot.stored_bytes / tot.original_bytes if tot.original_bytes else 0.0
            peak = getattr(rep, "peak_bytes", None)
            self.setup.log.info(
                f"{head} activations stored {_mib(tot.stored_bytes)} of {_mib(tot.original_bytes)} "
                f"({ratio:.3f}x, {tot.bits:.2f} bits/element) in {tot.saves} saves"
                + (f", peak held {_mib(peak)}" if peak else "")
            )
            if self.setup.compiled:
                self.setup.log.info(
                    f"{head} compiled blocks held {_mib(st.compiled_bytes)} for backward "
                    "(agoq payloads included; not itemized by kind)"
                )
            if self.step == 1:
                self.setup.log.info(
                    f"{head} activation memory report by kind:\n{rep.table(group='kind')}"
                )
        if st.ddp_state is not None:
            self.setup.log.info(
                f"{head} gradients: int8 all-reduce hook calls so far {st.ddp_state.calls}"
            )
        if st.fsdp_modules:
            calls = sum(getattr(c, "calls", 0) for c in st.comms)
            full = sum(getattr(c, "full_precision_calls", 0) for c in st.comms)
            self.setup.log.info(
                f"{head} gradients: int8 reduce-scatter calls so far {calls} "
                f"(+{full} full-precision) on {st.fsdp_modules} FSDP modules"
            )
        if st.store is not None:
            self.setup.log.info(f"{head} 8-bit gradient store peak {_mib(st.store_peak)}")
            if self.step == 1 and st.store_peak == 0:
                self.setup.log.warning(
                    f"{head} grad_storage held nothing: no parameter of this part had a "
                    "gradient when a later micro-batch's forward started (a pipeline stage that "
                    "runs all its forwards before its backwards, or FSDP2 under PP, which keeps "
                    "unsharded gradients inside FSDP until the last micro-batch)"
                )


def _quantizes(plan: Any) -> bool:
    specs = [*plan.kinds.values(), plan.fallback]
    return any(isinstance(a, agoq.QuantSpec) for a in specs)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _on_meta(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args, *kwargs.values()))


def _reduce_scatter_comms(module: nn.Module) -> list:
    """The int8 comm objects installed on ``module``'s FSDP modules (diagnostics only)."""
    from torch.distributed.fsdp import FSDPModule

    from agoq._compat import fsdp_reduce_scatter_comms

    return [
        c
        for m in module.modules()
        if isinstance(m, FSDPModule)
        for c in fsdp_reduce_scatter_comms(m)
        if isinstance(c, agoq.Int8ReduceScatter)
    ]
