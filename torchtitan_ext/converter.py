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

import math
from typing import Any

from torch import nn
from torchtitan.protocols.model_converter import register_model_converter
from torchtitan.tools.logging import logger

from ._runtime import AgoqCall, AgoqRuntime, Setup
from .config import Agoq

NAME = "agoq"


class AgoqConverter:
    """torchtitan 0.2.2 ``ModelConverter`` for agoq (see the module docstring): reads the
    ``[agoq]`` section and torchtitan's config into an :class:`AgoqRuntime`."""

    def __init__(self, job_config: Any, parallel_dims: Any) -> None:
        cfg = getattr(job_config, "agoq", None)
        if not isinstance(cfg, Agoq):
            raise ValueError(
                "the 'agoq' model converter needs the [agoq] config section: start torchtitan "
                "with --job.custom_config_module torchtitan_ext.config (or set "
                '[job] custom_config_module = "torchtitan_ext.config")'
            )
        self.cfg, self.job_config, self.parallel_dims = cfg, job_config, parallel_dims
        self._n_layers: int | None = None
        pd, jc = parallel_dims, job_config
        self.runtime = AgoqRuntime(
            cfg,
            Setup(
                version="0.2.2",
                fsdp=pd.fsdp_enabled,
                dp_replicate=pd.dp_replicate_enabled,
                dp_replicate_degree=pd.dp_replicate,
                tp=pd.tp_enabled,
                pp=pd.pp_enabled,
                pp_degree=pd.pp,
                mesh=lambda name: pd.get_mesh(name),
                forwards_per_step=self._forwards_per_step(),
                schedule=jc.parallelism.pipeline_parallel_schedule,
                schedule_csv=bool(jc.parallelism.pipeline_parallel_schedule_csv),
                n_microbatches=jc.training.local_batch_size
                // jc.parallelism.pipeline_parallel_microbatch_size,
                stages_per_rank=self._stages_per_rank,
                compiled=bool(jc.compile.enable and "model" in jc.compile.components),
                ac_mode=jc.activation_checkpoint.mode,
                log_freq=jc.metrics.log_freq,
                log=logger,
            ),
        )
        self._converted = False

    # The runtime's state, under the names the 0.2.2 tests and users know.
    plan = property(lambda self: self.runtime.plan)
    grad_path = property(lambda self: self.runtime.grad_path)
    step = property(lambda self: self.runtime.step)
    _parts = property(lambda self: self.runtime.parts)

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
        if self._converted or isinstance(model, AgoqCall):
            raise RuntimeError("the agoq converter was applied twice")
        self._converted = True
        layers = getattr(model, "layers", None)
        self._n_layers = len(layers) if layers is not None else None
        cls = type(model)
        model.__class__ = type(
            f"Agoq{cls.__name__}", (AgoqCall, cls), {"_agoq_runtime": self.runtime}
        )
        self.runtime.announce()

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        """After every optimizer step: check the gradient store, log the report."""
        self.runtime.post_optimizer(model)


register_model_converter(AgoqConverter, NAME)
