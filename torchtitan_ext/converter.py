"""agoq as a torchtitan 0.2.2 model converter, registered as ``"agoq"``.

Enable with::

    --experimental.custom_import torchtitan_ext.converter
    --job.custom_config_module torchtitan_ext.config
    [model] converters = ["agoq"]      # or --model.converters agoq

A thin shell: it turns the ``[agoq]`` section (:mod:`torchtitan_ext.config`) and torchtitan's
lifecycle into public agoq calls (``ActivationPlan.from_dict`` / ``.for_stage``,
``quantize_activations``, ``Int8AllReduceState`` + ``int8_allreduce``,
``install_int8_reduce_scatter``, ``Int8GradStore``, ``MemoryReport``). No CPU special cases
live here (those are in :mod:`torchtitan_ext.cpu_shims`).

Lifecycle (torchtitan 0.2.2 ``Trainer.__init__``): ``convert(model)`` runs on the meta-device
model *before* pipeline splitting, tensor parallelism, activation checkpointing, compile and
FSDP/DDP, and ``post_optimizer_hook(model_parts)`` only *after* each optimizer step, so
neither sees the final model parts before the first forward. ``convert`` therefore only
marks the model: its class gets a ``__call__`` in front (the way ``fully_shard`` and
``replicate`` re-class modules), which survives the pipeline split (a deepcopy per stage) and
the later re-classing by FSDP/DDP. Each model part's first call installs, on the fully
parallelized part:

- its activation context: ``quantize_activations(plan)`` entered around every training
  forward of the part, *outside* the module's own call, so agoq sees the part as the root
  (full FQNs in the report) and compiled blocks run inside an ambient context (agoq's
  compile path). Under pipeline parallelism the plan is ``plan.for_stage(pp_rank, pp,
  schedule, n_microbatches=..., stages_per_rank=...)``.
- the gradient hook: with replicate-only data parallelism (0.2.2's DDP via ``replicate``)
  ``part.register_comm_hook(Int8AllReduceState(...), int8_allreduce)``, registered before
  ``replicate``'s lazy DDP init (which happens in its own forward pre-hook); with FSDP2 /
  HSDP ``install_int8_reduce_scatter(part)``.
- with ``grad_storage``, an ``Int8GradStore`` over the part's parameters: before every
  training forward the gradients accumulated so far are folded into it (``accumulate()``:
  8 bits, ``p.grad = None``), and a hook on the part's output writes them back
  (``materialize()``) when that micro-batch's backward reaches the part, before any of its
  parameter gradients is added. So every forward after the first runs with the
  accumulated gradients in 8 bits, and ``clip_grad_norm_`` / the optimizer see ordinary
  ``p.grad``. No micro-batch counting is involved (torch's pipeline stages run an extra,
  gradient-free forward for metadata inference on the first step).

- with ``numerics_check_every = N``, an ``agoq.NumericsGuard`` per part (``numerics_threshold``
  for the gradient buckets, ``numerics_action``). It goes into the DDP hook state (one
  bucket checked every N steps). For activations, torchtitan computes the loss outside the
  model, so the converter captures, on a due step, the first training forward's inputs and
  the gradient arriving at the part's output; after the optimizer step it runs
  ``guard.check_activations`` on the part (its ``forward``, bypassing replicate's DDP hooks)
  with the loss ``sum(output * captured_grad)``: the parameter gradient with and without
  the plan for that micro-batch's real output gradient (at the updated weights). Under
  FSDP2/HSDP neither check is available (FSDP's backward hooks would reduce the check's
  gradients; its reduce-scatter has no guard): a warning says so.

``post_optimizer_hook`` logs the memory report and hook counters and checks that no
gradient was left in the store. Composes with torchtitan's activation checkpointing (does not
replace it): under AC agoq only sees what checkpointing keeps, the checkpointed blocks'
inputs, which the converter stores as ``norm_input`` (the residual stream; 4-bit in the
paper's plan); set ``[activation_checkpoint] mode = "none"`` to let agoq store every
activation instead of recomputing.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchtitan.protocols.model_converter import register_model_converter
from torchtitan.tools.logging import logger

import agoq
from agoq.memory import compiled_saved_bytes

from .config import Agoq

NAME = "agoq"
AC_BLOCK_PATTERN = r"(?:^|\.)layers\.\d+$"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


class _AgoqCall:
    """Put in front of the model's class by :meth:`AgoqConverter.convert`."""

    _agoq_converter: AgoqConverter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self)._agoq_converter._call(self, args, kwargs)


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


class AgoqConverter:
    """torchtitan ``ModelConverter`` for agoq (see the module docstring)."""

    def __init__(self, job_config: Any, parallel_dims: Any) -> None:
        cfg = getattr(job_config, "agoq", None)
        if not isinstance(cfg, Agoq):
            raise ValueError(
                "the 'agoq' model converter needs the [agoq] config section: start torchtitan "
                "with --job.custom_config_module torchtitan_ext.config (or set "
                '[job] custom_config_module = "torchtitan_ext.config")'
            )
        self.cfg = cfg
        self.job_config = job_config
        self.parallel_dims = parallel_dims
        self.plan = cfg.activation_plan()
        if self.plan is not None and job_config.activation_checkpoint.mode != "none":
            # Under torchtitan's AC the checkpoint wrapper (which takes the block's place,
            # "layers.<i>") saves only the block input: the residual stream, i.e. what the
            # plan calls norm_input. Without this rule it would be "other" (kept).
            rule = agoq.KindRule("norm_input", AC_BLOCK_PATTERN)
            self.plan = dataclasses.replace(self.plan, rules=(rule, *self.plan.rules))
        self.compiled = bool(job_config.compile.enable and "model" in job_config.compile.components)
        if self.compiled and parallel_dims.tp_enabled and self.plan is not None:
            # Measured on torch 2.13 (CPU): compiled TP blocks with the activation hooks
            # inlined fail in AOTAutograd's DTensor backward wrapper ("not enough values to
            # unpack"); a clear refusal instead of that error.
            raise ValueError(
                "[agoq] activations under tensor parallelism with torch.compile are not "
                "supported: torch 2.13's compiled backward of DTensor blocks with saved-tensor "
                "hooks inlined fails in AOTAutograd (torchtitan's TP + compile also fails on "
                'CPU without agoq). Disable [compile], or set [agoq] activations = "off"'
            )
        self.grad_path = self._grad_path()
        self.forwards_per_step = self._forwards_per_step()
        self.step = 0
        self._parts: weakref.WeakKeyDictionary[nn.Module, _Part] = weakref.WeakKeyDictionary()
        self._n_layers: int | None = None
        self._converted = False

    # ------------------------------------------------------------ configuration

    def _grad_path(self) -> str | None:
        pd = self.parallel_dims
        if self.cfg.grad_bits == 0:
            return None
        if pd.fsdp_enabled:
            return "hsdp" if pd.dp_replicate_enabled else "fsdp"
        if pd.dp_replicate_enabled:
            return "ddp"
        return None  # no data parallelism: nothing to reduce

    def _forwards_per_step(self) -> int:
        """Training forwards of one model part per optimizer step (as torchtitan counts)."""
        jc, pd = self.job_config, self.parallel_dims
        batch_degree = pd.dp_replicate * pd.dp_shard if pd.dp_enabled else 1
        gbs = jc.training.global_batch_size
        local = jc.training.local_batch_size
        accum = 1 if gbs < 0 else gbs // (local * batch_degree)
        if pd.pp_enabled:
            accum *= local // jc.parallelism.pipeline_parallel_microbatch_size
        return max(accum, 1)

    def _stage_plan(self) -> tuple[Any, str]:
        """This rank's plan under pipeline parallelism, and a note for the log."""
        plan, cfg, pd = self.plan, self.cfg, self.parallel_dims
        if plan is None or not pd.pp_enabled or not cfg.stage_aware:
            return plan, ""
        par = self.job_config.parallelism
        if par.pipeline_parallel_schedule_csv:
            return plan, " (stage-aware bits skipped: CSV pipeline schedule)"
        if cfg.activation_bits not in (4, 5, 6, 8):
            return (
                plan,
                f" (stage-aware bits need activation_bits in 4/5/6/8, not {cfg.activation_bits})",
            )
        rank = pd.get_mesh("pp").get_local_rank()
        n_mb = self.job_config.training.local_batch_size // par.pipeline_parallel_microbatch_size
        spr = self._stages_per_rank()
        try:
            staged = plan.for_stage(
                rank,
                pd.pp,
                par.pipeline_parallel_schedule,
                n_microbatches=n_mb,
                stages_per_rank=spr,
                base_bits=cfg.activation_bits,
            )
        except ValueError as e:
            logger.warning(
                f"[agoq] stage-aware activation bits unavailable ({e}); using the plan as is"
            )
            return plan, " (stage-aware bits unavailable for this schedule)"
        bits = sorted({a.bits for a in staged.kinds.values() if isinstance(a, agoq.QuantSpec)})
        return staged, (
            f" (stage-aware: pp rank {rank}/{pd.pp}, {par.pipeline_parallel_schedule}, "
            f"{n_mb} micro-batches, {spr} stage(s)/rank -> bits {bits or 'keep'})"
        )

    def _stages_per_rank(self) -> int:
        """Model chunks per pipeline rank, computed as torchtitan's ``pipeline_llm`` does."""
        from torch.distributed.pipelining.schedules import (
            PipelineScheduleSingle,
            get_schedule_class,
        )

        par, pp = self.job_config.parallelism, self.parallel_dims.pp
        if par.module_fqns_per_model_part:
            return max(1, len(par.module_fqns_per_model_part) // pp)
        if par.pipeline_parallel_layers_per_stage is not None and self._n_layers is not None:
            n = self._n_layers + par.pipeline_parallel_first_stage_less_layers
            n += par.pipeline_parallel_last_stage_less_layers
            return max(1, math.ceil(n / par.pipeline_parallel_layers_per_stage) // pp)
        cls = get_schedule_class(par.pipeline_parallel_schedule)
        return 1 if issubclass(cls, PipelineScheduleSingle) else 2

    # ---------------------------------------------------------- torchtitan API

    def convert(self, model: nn.Module) -> None:
        """Mark the (meta-device, unparallelized) model; see the module docstring."""
        if self._converted or isinstance(model, _AgoqCall):
            raise RuntimeError("the agoq converter was applied twice")
        self._converted = True
        layers = getattr(model, "layers", None)
        self._n_layers = len(layers) if layers is not None else None
        cls = type(model)
        model.__class__ = type(f"Agoq{cls.__name__}", (_AgoqCall, cls), {"_agoq_converter": self})

        cfg, jc = self.cfg, self.job_config
        acts = "off" if self.plan is None else f"plan {cfg.activations!r}"
        grads = {
            None: "off" if cfg.grad_bits == 0 else "off (no data parallelism)",
            "ddp": "int8 all-reduce DDP comm hook"
            + (" with error feedback" if cfg.error_feedback else ""),
            "fsdp": "int8 FSDP2 reduce-scatter",
            "hsdp": "int8 FSDP2 reduce-scatter over the shard group "
            "(the replicate all-reduce stays full precision)",
        }[self.grad_path]
        logger.info(
            f"[agoq] converter on: activations {acts}, gradients {grads}, 8-bit gradient "
            f"storage {'on' if cfg.grad_storage else 'off'}"
        )
        if self.plan is not None:
            logger.info("[agoq] activation plan:\n" + self.plan.describe())
        if self.plan is not None and jc.activation_checkpoint.mode != "none":
            logger.warning(
                f"[agoq] activation checkpointing is {jc.activation_checkpoint.mode!r}: agoq "
                "composes with it and only stores what checkpointing keeps (the checkpointed "
                'regions\' inputs); set [activation_checkpoint] mode = "none" to let agoq '
                "store every saved activation instead"
            )
        if cfg.error_feedback and self.grad_path in ("fsdp", "hsdp"):
            logger.warning(
                "[agoq] error_feedback applies to the DDP path only; ignored under FSDP2"
            )
        if cfg.grad_storage and self.forwards_per_step == 1:
            logger.warning(
                "[agoq] grad_storage has nothing to hold: one forward per optimizer step (set "
                "training.global_batch_size > local_batch_size x data-parallel degree, or use PP)"
            )

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        """After every optimizer step: check the gradient store, log the report."""
        self.step += 1
        parts = model if isinstance(model, list) else [model]
        freq = max(1, self.job_config.metrics.log_freq)
        log = self.cfg.report and (self.step == 1 or self.step % freq == 0)
        for m in parts:
            st = self._parts.get(m)
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

    # ------------------------------------------------------------------ runtime

    def _call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        call = super(_AgoqCall, module).__call__
        st = self._parts.get(module)
        if st is None:
            st = self._install(module)
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
        if st.ctx is not None and self.compiled and self.cfg.report:
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

    def _install(self, module: nn.Module) -> _Part:
        st = _Part(index=len(self._parts))
        self._parts[module] = st
        cfg = self.cfg
        plan, st.plan_note = self._stage_plan()
        if plan is not None:
            st.ctx = agoq.quantize_activations(plan)
        if cfg.numerics_check_every:
            st.guard = agoq.NumericsGuard(
                every=cfg.numerics_check_every,
                threshold=cfg.numerics_threshold,
                activation_threshold=cfg.numerics_activation_threshold,
                action=cfg.numerics_action,
                log=lambda line, i=st.index: logger.info(f"[agoq] part {i}: {line}"),
            )
            self._guard_setup(module, st)
        if self.grad_path == "ddp":
            if not hasattr(module, "register_comm_hook"):
                raise RuntimeError(
                    "[agoq] expected torchtitan's replicate()d model part (DDP) with "
                    f"register_comm_hook, got {type(module).__name__}"
                )
            kw = {"block": cfg.grad_block} if cfg.grad_block else {}
            group = self.parallel_dims.get_mesh("dp_replicate").get_group()
            st.ddp_state = agoq.Int8AllReduceState(
                group, error_feedback=cfg.error_feedback, model=module, guard=st.guard, **kw
            )
            module.register_comm_hook(st.ddp_state, agoq.int8_allreduce)
        elif self.grad_path in ("fsdp", "hsdp"):
            kw = {"block": cfg.grad_block} if cfg.grad_block else {}
            st.fsdp_modules = agoq.install_int8_reduce_scatter(module, **kw)
            st.comms = _reduce_scatter_comms(module)
        if cfg.grad_storage and self.forwards_per_step > 1:
            st.store = agoq.Int8GradStore([p for p in module.parameters() if p.requires_grad])
        logger.info(
            f"[agoq] model part {st.index} ({type(module).__name__}): activation context "
            f"{'on' + st.plan_note if st.ctx is not None else 'off'}; gradients "
            + (
                f"int8 DDP comm hook on {self.parallel_dims.dp_replicate} replicas"
                if st.ddp_state is not None
                else f"int8 reduce-scatter on {st.fsdp_modules} FSDP modules"
                if st.fsdp_modules
                else "unchanged"
            )
            + (f"; 8-bit gradient store over {len(st.store.params)} parameters" if st.store else "")
        )
        return st

    def _guard_setup(self, module: nn.Module, st: _Part) -> None:
        """Decide which of the guard's checks this part supports, and say so."""
        from torch.distributed.tensor import DTensor

        sharded = self.parallel_dims.fsdp_enabled or any(
            isinstance(p, DTensor) for p in module.parameters()
        )
        st.check_activations = not sharded and st.ctx is not None and _quantizes(st.ctx.plan)
        what = [
            *(["activations"] if st.check_activations else []),
            *(["DDP gradient buckets"] if self.grad_path == "ddp" else []),
        ]
        if sharded:
            logger.warning(
                f"[agoq] part {st.index}: the numerics guard cannot check FSDP2/DTensor "
                "parameters (FSDP's backward hooks would reduce the check's gradients, and "
                "agoq's int8 reduce-scatter has no guard)"
            )
        logger.info(
            f"[agoq] part {st.index}: numerics guard every {st.guard.every} steps on "
            f"{' and '.join(what) or 'nothing (no quantized activations, no int8 DDP hook)'}"
        )

    def _check_activations(self, module: nn.Module, st: _Part, capture: _Capture) -> None:
        """Run the guard's activation check on the captured micro-batch, if it got its
        output gradient (a forward whose backward never ran is dropped)."""
        if not capture.ready():
            return
        group: Any = "local"  # pipeline ranks hold different parts: nothing to agree on
        if self.parallel_dims.dp_replicate_enabled:  # replicas agree on every decision
            group = self.parallel_dims.get_mesh("dp_replicate").get_group()
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
            logger.info(
                f"{head} activations stored {_mib(tot.stored_bytes)} of {_mib(tot.original_bytes)} "
                f"({ratio:.3f}x, {tot.bits:.2f} bits/element) in {tot.saves} saves"
                + (f", peak held {_mib(peak)}" if peak else "")
            )
            if self.compiled:
                logger.info(
                    f"{head} compiled blocks held {_mib(st.compiled_bytes)} for backward "
                    "(agoq payloads included; not itemized by kind)"
                )
            if self.step == 1:
                logger.info(f"{head} activation memory report by kind:\n{rep.table(group='kind')}")
        if st.ddp_state is not None:
            logger.info(f"{head} gradients: int8 all-reduce hook calls so far {st.ddp_state.calls}")
        if st.fsdp_modules:
            calls = sum(getattr(c, "calls", 0) for c in st.comms)
            full = sum(getattr(c, "full_precision_calls", 0) for c in st.comms)
            logger.info(
                f"{head} gradients: int8 reduce-scatter calls so far {calls} "
                f"(+{full} full-precision) on {st.fsdp_modules} FSDP modules"
            )
        if st.store is not None:
            logger.info(f"{head} 8-bit gradient store peak {_mib(st.store_peak)}")
            if self.step == 1 and st.store_peak == 0:
                logger.warning(
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
    """The comm objects installed on ``module``'s FSDP modules (diagnostics only; reads
    FSDP2's private param-group attribute, and returns [] if that ever moves)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            for g in getattr(state, "_fsdp_param_groups", []):
                comm = getattr(g, "_reduce_scatter_comm", None)
                if isinstance(comm, agoq.Int8ReduceScatter):
                    out.append(comm)
    return out


register_model_converter(AgoqConverter, NAME)
