"""agoq as a torchtitan 0.3 ``ModelConfigConverter``, plus its ``post_optimizer_build_fn``.

torchtitan 0.3 has no TOML, no ``JobConfig`` and no converter registry: a run is a Python
function returning a ``Trainer.Config`` (``--module <module> --config <function>``), and a
converter rewrites the *model config* before the model is built. Two pieces therefore:

- :class:`AgoqConverter` (its ``Config`` holds the ``[agoq]`` settings, or the path of a TOML
  file whose ``[agoq]`` table has them: the same table as the 0.2.2 adapter's). ``convert``
  returns the model config under a subclass whose model class puts
  :class:`~torchtitan_ext._runtime.AgoqCall` in front (the way ``fully_shard`` re-classes
  modules), so every call of every model part reaches agoq, through the pipeline split's
  deepcopies and FSDP's re-classing. Its ``update_from_config`` keeps the ``Trainer.Config``
  torchtitan hands it (parallelism, batch sizes, schedule, compile, AC).
- :func:`post_optimizer_build_fn`: called by the trainer once, on the final model parts (TP,
  AC, compile, FSDP applied, weights initialised), with ``ParallelDims``. It installs, per
  part: the activation context (stage-aware plan under PP), the int8 FSDP2 reduce-scatter,
  the 8-bit gradient store, the numerics guard; and registers an optimizer step post-hook
  that logs the memory report. A converted model called without it raises.

:func:`with_agoq` does both on any ``Trainer.Config`` (one call in a recipe). The per-part
behaviour is :mod:`torchtitan_ext._runtime`, shared with the 0.2.2 adapter; no CPU special
case lives here (see :mod:`torchtitan_ext.v03.cpu_shims`).

torchtitan 0.3's ``ChunkedLossWrapper`` (the llama3 default loss) runs ``lm_head`` and the
loss outside the model's forward, one sequence chunk at a time with its own backward: those
saves live for one chunk only, so agoq leaves them alone; the context covers the decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.tools.logging import logger

from .._runtime import AgoqCall, AgoqRuntime, Setup
from ..config import Agoq

VERSION = "0.3"


class _Pending:
    """The class attribute the converted model calls through: an :class:`AgoqRuntime`
    once :func:`post_optimizer_build_fn` has seen the model parts."""

    def __init__(self, cfg: Agoq) -> None:
        self.cfg = cfg
        self.trainer_config: Any = None  # torchtitan's Trainer.Config, via update_from_config
        self.runtime: AgoqRuntime | None = None

    def call(self, module: nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self.runtime is None:
            raise RuntimeError(
                "[agoq] this model was converted by torchtitan_ext.v03's AgoqConverter, but "
                "agoq's post_optimizer_build_fn never ran, so nothing is installed: use "
                "torchtitan_ext.v03.with_agoq(trainer_config) or set model_spec."
                "post_optimizer_build_fn = torchtitan_ext.v03.post_optimizer_build_fn("
                "model_spec.post_optimizer_build_fn)"
            )
        return self.runtime.call(module, call, args, kwargs)


def _settings(agoq: Agoq | None, toml_file: str) -> Agoq:
    if toml_file and agoq is not None:
        raise ValueError("[agoq] give the settings (agoq=...) or a toml_file, not both")
    if toml_file:
        return Agoq.from_toml(toml_file)
    if agoq is None:
        return Agoq()
    if not isinstance(agoq, Agoq):
        raise TypeError(
            f"[agoq] AgoqConverter.Config.agoq must be torchtitan_ext.config.Agoq, got "
            f"{type(agoq).__name__}"
        )
    return agoq


class AgoqConverter(ModelConfigConverter):
    """Wraps the model config so that the built model's calls go through agoq."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        agoq: Agoq | None = None
        """The ``[agoq]`` settings (None: the defaults, the paper's plan)."""

        toml_file: str = ""
        """A TOML file whose ``[agoq]`` table holds the settings (the 0.2.2 adapter's keys;
        other tables are ignored, so a 0.2.2 job TOML works as is)."""

    def __init__(self, config: Config) -> None:
        self.settings = _settings(config.agoq, config.toml_file)

    def convert(self, model_config: Any) -> Any:
        """The model config under a subclass whose model routes its calls to agoq."""
        if isinstance(getattr(type(model_config), "_owner", None), type) and issubclass(
            type(model_config)._owner, AgoqCall
        ):
            raise RuntimeError("[agoq] the agoq converter was applied twice to this model config")
        pending = _Pending(self.settings)
        base_cfg = type(model_config)
        model_cls = base_cfg._owner
        if model_cls is None:
            raise TypeError(f"[agoq] {base_cfg.__qualname__} builds nothing (no owner class)")

        def update_from_config(self: Any, *, config: Any, **kwargs: Any) -> None:
            # Slots dataclass: no zero-argument super() (the class is recreated).
            base_cfg.update_from_config(self, config=config, **kwargs)
            pending.trainer_config = config

        cfg_cls = dataclass(kw_only=True, slots=True)(
            type("Config", (base_cfg,), {"update_from_config": update_from_config})
        )
        cfg_cls.__qualname__ = f"Agoq{model_cls.__name__}.Config"
        # Configurable.__init_subclass__ wires cfg_cls._owner to the new model class.
        type(
            f"Agoq{model_cls.__name__}",
            (AgoqCall, model_cls),
            {"Config": cfg_cls, "_agoq_runtime": pending},
        )
        values = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}
        return cfg_cls(**values)


def _setup(trainer_config: Any, parallel_dims: Any, n_parts: int) -> Setup:
    tc, pd = trainer_config, parallel_dims
    par, training = tc.parallelism, tc.training
    batch_degree = pd.dp_replicate * pd.dp_shard if pd.dp_enabled else 1
    gbs, local = training.global_batch_size, training.local_batch_size
    forwards = 1 if gbs < 0 else gbs // (local * batch_degree)
    n_mb = local // par.pipeline_parallel_microbatch_size
    if pd.pp_enabled:
        forwards *= n_mb
    ac = tc.activation_checkpoint
    compile_cfg = tc.compile
    return Setup(
        version=VERSION,
        fsdp=pd.fsdp_enabled,
        dp_replicate=pd.dp_replicate_enabled,
        # 0.3's data_parallel_replicate is FSDP2 (HSDP, shard size 1): its all-reduce is
        # FSDP's own, which agoq cannot replace, and there is no DDP comm hook.
        ddp=False,
        dp_replicate_degree=pd.dp_replicate,
        tp=pd.tp_enabled,
        pp=pd.pp_enabled,
        pp_degree=pd.pp,
        mesh=lambda name: pd.get_mesh(name),
        forwards_per_step=max(forwards, 1),
        schedule=par.pipeline_parallel_schedule,
        schedule_csv=bool(par.pipeline_parallel_schedule_csv),
        n_microbatches=n_mb,
        stages_per_rank=lambda: n_parts,  # this rank's model parts are its stages
        compiled=bool(compile_cfg.enable and "model" in compile_cfg.components),
        ac_mode="none" if ac is None else type(ac).__qualname__.split(".")[0],
        log_freq=tc.metrics.log_freq,
        log=logger,
    )


def _install(optimizers: Any, model_parts: list[nn.Module], parallel_dims: Any) -> None:
    pendings = {id(p): p for p in (getattr(type(m), "_agoq_runtime", None) for m in model_parts)}
    pendings.pop(id(None), None)
    if not pendings:
        logger.warning(
            "[agoq] post_optimizer_build_fn: no model part was converted by AgoqConverter "
            "(add it to model_registry(..., converters=[...]) or use with_agoq): nothing installed"
        )
        return
    if len(pendings) > 1:
        raise RuntimeError("[agoq] the model parts come from different AgoqConverter conversions")
    (pending,) = pendings.values()
    if not isinstance(pending, _Pending) or pending.trainer_config is None:
        raise RuntimeError(
            "[agoq] the converted model config never got torchtitan's update_from_config "
            "(was the model built outside torchtitan's Trainer?)"
        )
    if pending.runtime is not None:
        raise RuntimeError("[agoq] post_optimizer_build_fn ran twice for the same model")
    runtime = AgoqRuntime(
        pending.cfg, _setup(pending.trainer_config, parallel_dims, len(model_parts))
    )
    runtime.announce()
    for m in model_parts:
        runtime.install(m)
    pending.runtime = runtime
    optimizers.register_step_post_hook(lambda *a, **k: runtime.post_optimizer(model_parts))


def post_optimizer_build_fn(previous: Callable[..., None] | None = None) -> Callable[..., None]:
    """A ``ModelSpec.post_optimizer_build_fn`` that runs ``previous`` (the model's own, e.g.
    MoE load balancing), then installs agoq on the model parts."""
    if previous is not None and getattr(previous, "_agoq", False):
        return previous

    def build(optimizers: Any, model_parts: list[nn.Module], parallel_dims: Any) -> None:
        if previous is not None:
            previous(optimizers, model_parts, parallel_dims)
        _install(optimizers, model_parts, parallel_dims)

    build._agoq = True  # type: ignore[attr-defined]
    return build


def with_agoq(trainer_config: Any, agoq: Agoq | None = None, *, toml_file: str = "") -> Any:
    """``trainer_config`` with agoq on: its model config converted by
    :class:`AgoqConverter` and its model spec's ``post_optimizer_build_fn`` chained."""
    spec = trainer_config.model_spec
    if spec is None:
        raise ValueError("[agoq] with_agoq: the trainer config has no model_spec")
    conv = AgoqConverter.Config(agoq=agoq, toml_file=toml_file).build()
    spec.model = conv.convert(spec.model)
    spec.post_optimizer_build_fn = post_optimizer_build_fn(spec.post_optimizer_build_fn)
    return trainer_config


__all__ = ["AgoqConverter", "post_optimizer_build_fn", "with_agoq"]
