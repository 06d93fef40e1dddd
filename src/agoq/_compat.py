"""Every private PyTorch API agoq touches, in one place, resolved lazily and version-gated.

``import agoq`` imports no private torch module and reads no private attribute: each entry
below resolves its private API at its first call and caches it. When the API is missing
(renamed or removed in another torch), the entry either raises :class:`TorchCompatError`
naming the agoq feature, what is missing and the tested torch range, or, where agoq has a
safe alternative, takes that fallback (said so in its docstring; never a silent change of
numerics). ``require_torch`` refuses features whose *behaviour* (not just the presence of
an API) agoq relies on, on torch releases older than it was verified against.

Entries (feature that uses it -> private API):

* :func:`saved_tensor_hook_context` (compiled activation quantization) ->
  ``torch._functorch._aot_autograd.graph_compile._get_saved_tensor_hook_context``;
  fallback: None (no per-node information), with a one-time warning.
* :func:`top_saved_tensors_hooks` (ActivationContext, NumericsGuard.check_activations) ->
  ``torch._C._autograd._top_saved_tensors_default_hooks``.
* :func:`no_static_hooks_filtering` (ActivationContext around torch.compile regions) ->
  ``torch._functorch.config.saved_tensors_hooks_filtering_mode``.
* :func:`dtensor_local` (DTensor activations) -> ``DTensor._local_tensor``.
* :func:`tensor_version` / :func:`view_base` (the activation context's in-place checks and
  views) -> ``Tensor._version``, ``Tensor._base``.
* :func:`module_buffers` (ActivationContext, NumericsGuard) -> ``Module._buffers``.
* :func:`has_own_hooks` (activation rebuild) -> ``Module._forward_pre_hooks`` /
  ``Module._forward_hooks``.
* :func:`never_rebuilt_types` (activation rebuild) -> ``nn.modules.dropout._DropoutNd``,
  ``nn.modules.batchnorm._NormBase``.
* :class:`GlobalModuleHooks` (ActivationContext's module tracking) -> the global hook
  dicts of ``torch.nn.modules.module``.
* :func:`functional_collectives` (int8_all_reduce_functional, compiled DDP) ->
  ``torch.distributed._functional_collectives``.
* :func:`group_timeout` (Int8AllReduceState) -> ``ProcessGroup._get_backend().options.
  _timeout``; fallback: None (torch's default timeout).
* :func:`queue_backward_callback` (Int8AllReduceState error reporting) ->
  ``Variable._execution_engine.queue_callback``; fallback: False (not queued).
* :func:`work_from_future` (Int8ReduceScatter with async_op) ->
  ``torch._C._distributed_c10d._create_work_from_future``.
* :func:`fsdp_reduce_scatter_base` (Int8ReduceScatter) ->
  ``torch.distributed.fsdp._fully_shard._fsdp_api.ReduceScatter``; gated on torch >= 2.13.
* :func:`fsdp_shard_sizes` (per-parameter blocks of the FSDP2 comms) -> FSDP2's private
  parameter-group state; fallback: None (plain blocks, same values, coarser scales).
* :func:`fsdp_reduce_scatter_comms` (torchtitan adapters' call counters) -> the same
  state's ``_reduce_scatter_comm``; fallback: [].
* :func:`fsdp_has_replicate_dim` (install_int8_all_reduce_hook) -> the same state and
  ``_fsdp_common.DDPMeshInfo``.
* :func:`ddp_sync_flag` (Int8GradStore's DDP guard) -> ``DDP.require_forward_param_sync``.
* :func:`compiled_original` (FQNs under torch.compile) -> ``OptimizedModule._orig_mod``.
* :func:`is_traceable_wrapper_subclass` (MemoryReport) -> ``torch.utils._python_dispatch``.
* :func:`pipeline_action` / :func:`run_step_microbatches` (agoq.pipeline) ->
  ``schedules._Action``, ``_step_microbatches``, ``_initialize_stage``.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import torch.distributed as dist

# The torch minor releases agoq's use of private APIs was verified on.
TESTED_TORCH: tuple[str, ...] = ("2.13", "2.14")

__all__ = [
    "TESTED_TORCH",
    "GlobalModuleHooks",
    "TorchCompatError",
    "compiled_original",
    "ddp_sync_flag",
    "dtensor_local",
    "fsdp_has_replicate_dim",
    "fsdp_reduce_scatter_base",
    "fsdp_reduce_scatter_comms",
    "fsdp_shard_sizes",
    "functional_collectives",
    "group_timeout",
    "missing",
    "module_buffers",
    "has_own_hooks",
    "is_traceable_wrapper_subclass",
    "never_rebuilt_types",
    "no_static_hooks_filtering",
    "pipeline_action",
    "queue_backward_callback",
    "require_torch",
    "run_step_microbatches",
    "saved_tensor_hook_context",
    "top_saved_tensors_hooks",
    "tensor_version",
    "torch_version",
    "view_base",
    "work_from_future",
]


class TorchCompatError(RuntimeError):
    """A private torch API an agoq feature needs is missing, or this torch is too old."""


def _tested() -> str:
    return f"tested on torch {' and '.join(TESTED_TORCH)}"


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch (``2.13.0a0+git...`` -> (2, 13))."""
    m = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if m is None:  # pragma: no cover - a torch without a numeric version
        raise TorchCompatError(f"agoq: cannot parse torch version {torch.__version__!r}")
    return int(m.group(1)), int(m.group(2))


def require_torch(feature: str, minimum: str) -> None:
    """Raise :class:`TorchCompatError` unless torch is at least ``minimum`` ("2.13").

    Pre-releases of ``minimum`` itself pass: only the (major, minor) pair is compared."""
    want = tuple(int(x) for x in minimum.split(".")[:2])
    have = torch_version()
    if have < want:
        raise TorchCompatError(
            f"agoq: {feature} needs torch >= {minimum} ({_tested()}); this is torch "
            f"{torch.__version__}"
        )


def missing(feature: str, what: str, cause: BaseException | None = None) -> TorchCompatError:
    """The error for ``feature`` when the private torch API ``what`` is not there."""
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return TorchCompatError(
        f"agoq: {feature} needs {what} (a private torch API; {_tested()}); this torch "
        f"{torch.__version__} has no such API{why}"
    )


def _lookup(feature: str, module: str, attr: str = "") -> Any:
    """``module`` imported, then ``attr`` (dotted) read from it; a clear error when absent."""
    what = f"{module}.{attr}" if attr else module
    try:
        obj: Any = importlib.import_module(module)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise missing(feature, what, e) from None
    return obj


# --------------------------------------------------------------- activations

_F_COMPILED = "compiled activation quantization (ActivationContext around torch.compile)"
_F_CONTEXT = "the activation context (ActivationContext, NumericsGuard.check_activations)"
_F_DTENSOR = "activation quantization of DTensor activations (tensor parallel)"
_F_REBUILD = "activation rebuild (ActivationPlan recompute kinds)"
_F_MODULE_HOOKS = "the activation context's module tracking (ActivationContext)"
_F_INPLACE = "the activation context's in-place checks and view handling"
_F_BUFFERS = "buffer tracking (ActivationContext static inputs, NumericsGuard buffer restore)"


# Resolved at first call. Plain module globals, not functools.cache: these two run once
# per saved tensor, and Dynamo may trace the callers (a global read is free for it).
_saved_hook_context_fn: Callable[[], dict[str, Any] | None] | None = None
_top_hooks_fn: Callable[[bool], Any] | None = None


def _resolve_saved_hook_context() -> Callable[[], dict[str, Any] | None]:
    global _saved_hook_context_fn
    try:
        fn = _lookup(
            _F_COMPILED,
            "torch._functorch._aot_autograd.graph_compile",
            "_get_saved_tensor_hook_context",
        )
    except TorchCompatError as e:
        # Eager quantization does not need it; compiled regions then get no per-node
        # information, which agoq treats as "not inside AOTAutograd's hook inlining".
        warnings.warn(
            f"{e}; agoq falls back to the eager path of its saved-tensor hooks",
            RuntimeWarning,
            stacklevel=3,
        )

        def fn() -> None:
            return None

    _saved_hook_context_fn = fn
    return fn


def saved_tensor_hook_context() -> dict[str, Any] | None:
    """AOTAutograd's per-node information while it inlines a GraphModule saved-tensor hook
    pair into a compiled graph; None in eager, and (fallback, warned once) on a torch
    without that private API."""
    fn = _saved_hook_context_fn
    if fn is None:
        fn = _resolve_saved_hook_context()
    return fn()


def top_saved_tensors_hooks() -> tuple[Any, Any] | None:
    """The innermost (pack, unpack) saved-tensor hook pair of this thread, or None."""
    global _top_hooks_fn
    fn = _top_hooks_fn
    if fn is None:
        fn = _top_hooks_fn = _lookup(
            _F_CONTEXT, "torch._C", "_autograd._top_saved_tensors_default_hooks"
        )
    return fn(False)


def no_static_hooks_filtering() -> AbstractContextManager:
    """A context in which compiled regions apply saved-tensor hooks to every saved value
    except the region's static inputs (parameters, buffers)."""
    config = _lookup(_F_COMPILED, "torch._functorch.config")
    if not hasattr(config, "saved_tensors_hooks_filtering_mode"):
        raise missing(_F_COMPILED, "torch._functorch.config.saved_tensors_hooks_filtering_mode")
    return config.patch(saved_tensors_hooks_filtering_mode="no_static")


def dtensor_local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor a DTensor wraps (the same object at every call; the public
    ``to_local()`` returns a new view each time, and the context keys its tables by
    tensor identity)."""
    try:
        return t._local_tensor
    except AttributeError:
        raise missing(_F_DTENSOR, "torch.distributed.tensor.DTensor._local_tensor") from None


def tensor_version(t: torch.Tensor) -> int:
    """``t._version``: autograd's in-place counter (bumped by every in-place op)."""
    try:
        return t._version
    except AttributeError:
        raise missing(_F_INPLACE, "torch.Tensor._version") from None


def view_base(t: torch.Tensor) -> torch.Tensor | None:
    """``t._base``: the tensor ``t`` is a view of (None when ``t`` is not a view)."""
    try:
        return t._base
    except AttributeError:
        raise missing(_F_INPLACE, "torch.Tensor._base") from None


def module_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """``module._buffers``, the live dict of its own buffers (None entries included):
    the public ``named_buffers`` skips None and shared entries, and assigning through it
    is impossible (NumericsGuard puts replaced buffers back under their names)."""
    try:
        return module._buffers
    except AttributeError:
        raise missing(_F_BUFFERS, "torch.nn.Module._buffers") from None


def has_own_hooks(module: torch.nn.Module) -> bool:
    """True when ``module`` has forward pre-hooks or forward hooks of its own (e.g. tensor
    parallel's input/output redistribution): calling ``module.forward`` again would skip
    them, so such a module is never replayed."""
    try:
        return bool(module._forward_pre_hooks or module._forward_hooks)
    except AttributeError:
        raise missing(_F_REBUILD, "torch.nn.Module._forward_pre_hooks / _forward_hooks") from None


@functools.cache
def never_rebuilt_types() -> tuple[type, ...]:
    """Module types never rebuilt: dropout draws random numbers, norms with running
    statistics update them (torch's private base classes of both families)."""
    return (
        _lookup(_F_REBUILD, "torch.nn.modules.dropout", "_DropoutNd"),
        _lookup(_F_REBUILD, "torch.nn.modules.batchnorm", "_NormBase"),
    )


@functools.cache
def _global_hook_dicts() -> tuple[dict, dict, dict]:
    mod = "torch.nn.modules.module"
    return (
        _lookup(_F_MODULE_HOOKS, mod, "_global_forward_pre_hooks"),
        _lookup(_F_MODULE_HOOKS, mod, "_global_forward_hooks"),
        _lookup(_F_MODULE_HOOKS, mod, "_global_forward_hooks_always_called"),
    )


class GlobalModuleHooks:
    """A global module forward pre-hook and forward hook (``always_call``), installed and
    removed repeatedly under the keys of their first registration.

    Dynamo guards on the keys of torch's global hook dicts when it inlines a module call
    inside a compiled region, so hooks registered anew (new keys) at every context entry
    would recompile every compiled block at every step; with stable keys a region has two
    entries at most (hooks present / absent)."""

    def __init__(
        self,
        pre: Callable[[torch.nn.Module, Any], None],
        post: Callable[[torch.nn.Module, Any, Any], None],
    ) -> None:
        self._pre, self._post = pre, post
        self._keys: tuple[int, int] | None = None
        self.installed = False

    def install(self) -> None:
        """Register both hooks (no-op when installed)."""
        if self.installed:
            return
        pre_d, post_d, always_d = _global_hook_dicts()
        if self._keys is None:
            from torch.nn.modules import module as nn_module

            pre = nn_module.register_module_forward_pre_hook(self._pre)
            post = nn_module.register_module_forward_hook(self._post, always_call=True)
            self._keys = (pre.id, post.id)
        else:
            # What register_module_forward_(pre_)hook do, under the first keys.
            k_pre, k_post = self._keys
            pre_d[k_pre] = self._pre
            post_d[k_post] = self._post
            always_d[k_post] = True
        self.installed = True

    def remove(self) -> None:
        """Unregister both hooks (no-op when not installed)."""
        if not self.installed or self._keys is None:
            return
        pre_d, post_d, always_d = _global_hook_dicts()
        k_pre, k_post = self._keys
        pre_d.pop(k_pre, None)
        post_d.pop(k_post, None)
        always_d.pop(k_post, None)
        self.installed = False


# ----------------------------------------------------------------- gradients

_F_FUNCTIONAL = "int8_all_reduce_functional (compiled DDP)"
_F_ASYNC_RS = "Int8ReduceScatter(..., async_op=True)"
_F_FSDP_RS = "the FSDP2 int8 reduce-scatter (Int8ReduceScatter, install_int8_reduce_scatter)"
_F_FSDP_HOOK = "install_int8_all_reduce_hook (FSDP2)"
_F_GRAD_STORE = "Int8GradStore's DDP guard"
_FSDP = "torch.distributed.fsdp._fully_shard"


def functional_collectives() -> ModuleType:
    """``torch.distributed._functional_collectives`` (traceable collectives for compile)."""
    # An import statement, not importlib: Dynamo traces the caller (compiled DDP).
    try:
        import torch.distributed._functional_collectives as fcol
    except ImportError as e:
        raise missing(_F_FUNCTIONAL, "torch.distributed._functional_collectives", e) from None
    return fcol


def group_timeout(group: dist.ProcessGroup, device: torch.device) -> datetime.timedelta | None:
    """The timeout ``group`` was created with. Fallback: None when torch does not expose
    it; the caller then uses torch's default for the backend."""
    try:
        backend = group._get_backend(device)
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, TypeError):
        return None
    return timeout if isinstance(timeout, datetime.timedelta) else None


def queue_backward_callback(fn: Callable[[], None]) -> bool:
    """Run ``fn`` on the autograd thread when the current backward pass has finished its
    graph (before DDP's own finalize callback, when queued earlier). Fallback: False when
    not inside a backward pass or when this torch has no such hook (the caller then
    reports errors at its next call instead)."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if engine is None or not hasattr(engine, "queue_callback"):
        return False
    try:
        engine.queue_callback(fn)
    except RuntimeError:  # "Final callbacks can only be installed during backward pass"
        return False
    return True


def work_from_future(fut: torch.futures.Future) -> dist.Work:
    """A ``dist.Work`` that completes with ``fut`` (for callers that wait on Work)."""
    make = _lookup(_F_ASYNC_RS, "torch._C", "_distributed_c10d._create_work_from_future")
    return make(fut)


@functools.cache
def fsdp_reduce_scatter_base() -> type:
    """FSDP2's reduce-scatter comm interface, the base class of ``Int8ReduceScatter``.

    Gated on torch >= 2.13: the comm relies on how FSDP2 lays out and reduces the flat
    gradient it passes, verified on the tested releases only."""
    require_torch(_F_FSDP_RS, TESTED_TORCH[0])
    return _lookup(_F_FSDP_RS, f"{_FSDP}._fsdp_api", "ReduceScatter")


def _fsdp_param_groups(module: torch.nn.Module, feature: str) -> list:
    try:
        return list(module._get_fsdp_state()._fsdp_param_groups)
    except AttributeError as e:
        raise missing(feature, "FSDPModule._get_fsdp_state()._fsdp_param_groups", e) from None


def fsdp_shard_sizes(module: torch.nn.Module) -> list[int] | None:
    """Elements per FSDP-managed parameter in ``module``'s gradient shard, in packing
    order. Fallback: None when the module has several parameter groups or torch's private
    FSDP2 state looks different (callers then use plain blocks: the same reduction, with
    scales that may span two parameters)."""
    try:
        groups = _fsdp_param_groups(module, "per-parameter blocks in the FSDP2 int8 comms")
        if len(groups) != 1:
            return None
        return [int(p.padded_sharded_param_size.numel()) for p in groups[0].fsdp_params]
    except (TorchCompatError, AttributeError):
        return None


def fsdp_reduce_scatter_comms(module: torch.nn.Module) -> list:
    """The custom reduce-scatter objects installed on the FSDP2 ``module``'s parameter
    groups (diagnostics: the torchtitan adapters count int8 calls). Fallback: [] when
    torch's private FSDP2 state looks different (nothing is counted, nothing breaks)."""
    try:
        groups = _fsdp_param_groups(module, "counting the FSDP2 int8 reduce-scatter calls")
    except TorchCompatError:
        return []
    return [c for c in (getattr(g, "_reduce_scatter_comm", None) for g in groups) if c is not None]


def fsdp_has_replicate_dim(module: torch.nn.Module) -> bool:
    """True when a parameter group of the FSDP2 ``module`` has a replicate mesh dim
    (native HSDP, ``replicate_with_fsdp``): FSDP then all-reduces on its own."""
    ddp_mesh_info = _lookup(_F_FSDP_HOOK, f"{_FSDP}._fsdp_common", "DDPMeshInfo")
    groups = _fsdp_param_groups(module, _F_FSDP_HOOK)
    return any(isinstance(getattr(g, "mesh_info", None), ddp_mesh_info) for g in groups)


_DDP_SYNC_ATTR = "require_forward_param_sync"


def ddp_sync_flag(ddp: torch.nn.Module) -> bool:
    """DDP's private "this backward is synchronized" flag. Missing means torch changed it,
    and guessing would silently switch the guard off, so raise."""
    try:
        return bool(getattr(ddp, _DDP_SYNC_ATTR))
    except AttributeError:
        raise TorchCompatError(
            f"agoq: {_F_GRAD_STORE} needs DistributedDataParallel.{_DDP_SYNC_ATTR} (a private "
            f"torch API; {_tested()}); this torch {torch.__version__} has no such API. agoq "
            "reads it to refuse storing the gradients of a backward that DDP synchronizes. "
            "Use explicit accumulate() calls under no_sync(), or an agoq release that "
            "supports this torch"
        ) from None


def compiled_original(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps, else None."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None


# -------------------------------------------------------------------- others

_F_MEMORY = "MemoryReport (storage behind tensor subclasses)"
_F_PIPELINE = "agoq.pipeline (schedule-aware bit-widths)"


def is_traceable_wrapper_subclass(t: torch.Tensor) -> bool:
    """True when ``t`` is a wrapper tensor subclass (a DTensor, FSDP2's sharded
    parameters): its data lives in the inner tensors ``__tensor_flatten__`` names."""
    fn = _lookup(_F_MEMORY, "torch.utils._python_dispatch", "is_traceable_wrapper_subclass")
    return bool(fn(t))


@functools.cache
def pipeline_action() -> type:
    """``torch.distributed.pipelining.schedules._Action`` (one schedule action)."""
    return _lookup(_F_PIPELINE, "torch.distributed.pipelining.schedules", "_Action")


def run_step_microbatches(sched: Any) -> None:
    """Run a single-stage schedule's own ``_step_microbatches`` without its stage
    initializer (P2P warm-up and shape inference need a process group and a module;
    the compute order does not depend on them). Raises :class:`TorchCompatError` when
    the schedule has no ``_step_microbatches``."""
    step = getattr(sched, "_step_microbatches", None)
    if step is None:
        raise missing(_F_PIPELINE, f"{type(sched).__name__}._step_microbatches")
    sched._initialize_stage = lambda *args, **kwargs: None
    step()
