"""quantize_activations(plan): store tensors saved for backward in the plan's formats.

A thin shell over the pieces: while active, the context installs

* the saved-tensor hook pair (:mod:`.hooks`): pack hands each saved tensor to
  :meth:`ActivationContext._pack`, which stores it as the plan says and returns a handle
  (:mod:`.store`) that unpack turns back into a tensor;
* module tracking (:mod:`.classify`), so pack knows which module (FQN, kind) saves;
* a TorchFunctionMode recording recipes for cheap ops (:mod:`.recompute`).

Rules: parameters, buffers and views of them are kept; copies of parameters (autocast's
weight casts) are rebuilt from the parameter, never quantized; a tensor saved several
times at the same version is stored once; every handle checks at unpack that what it
came from was not modified in place; nothing is held once autograd frees the graph.
"""

from __future__ import annotations

from typing import Any

import torch

from ..memory import MemoryReport
from ..quant import QuantSpec, quantize
from ..quant.codec import is_dtensor
from ._compat import no_static_hooks_filtering, top_saved_tensors_hooks
from .classify import _CHAIN_NODES, ModuleTracker, parameter_source
from .dtensor import pack_dtensor
from .hooks import hook_pair, pop_active, push_active
from .plan import ActivationPlan
from .recompute import RecipeMode, Recipes
from .store import (
    Expanded,
    FromParameter,
    Handle,
    HeldKept,
    Kept,
    Quantized,
    Recipe,
    SaveTable,
    View,
    compact,
)

# dtypes the codec stores; anything else (float64, complex, ints) is kept untouched.
_CODEC_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))
_MAX_RECIPE_DEPTH = 16


class ActivationContext:
    """The object ``quantize_activations(plan)`` returns; use it as a context manager.

    The same context may be entered every step. ``report`` accumulates a
    :class:`~agoq.memory.MemoryReport` over every forward run inside the context
    (``report.clear()`` to start over). ``plan`` may be replaced between entries (e.g. by
    :class:`agoq.NumericsGuard` switching a kind to full precision).
    """

    def __init__(self, plan: ActivationPlan | None = None) -> None:
        if plan is None:
            plan = ActivationPlan.agoq()
        if not isinstance(plan, ActivationPlan):
            raise TypeError(
                f"quantize_activations expects an ActivationPlan, got {type(plan).__name__}"
            )
        self.plan = plan
        self.report = MemoryReport()
        self._tracker = ModuleTracker(plan)
        self._table = SaveTable()
        self._recipes = Recipes()
        self._handles: list[Any] = []
        self._active = False
        self._pair: tuple = ()

    # ----------------------------------------------------------- enter / exit

    def __enter__(self) -> ActivationContext:
        if self._active:
            raise RuntimeError("this quantize_activations context is already active")
        if not isinstance(self.plan, ActivationPlan):
            raise TypeError(f"ActivationContext.plan must be an ActivationPlan, got {self.plan!r}")
        self._active = True
        try:
            self._tracker.set_plan(self.plan)
            self._tracker.reset()
            self._pair = hook_pair(self.plan)
            hooks = torch.autograd.graph.saved_tensors_hooks(*self._pair)
            hooks.__enter__()
            self._handles = [hooks]
            push_active(self)  # installs the module hooks while any context is active
            self._handles.append(_Popper(self))
            # "no_static": the hooks also see a compiled region's non-static inputs (a
            # block's input, saved for its first norm), never its parameters or buffers.
            filtering = no_static_hooks_filtering()
            filtering.__enter__()
            self._handles.append(filtering)
            if self.plan.recompute:
                mode = RecipeMode(self._recipes, self._hooks_on_top)
                mode.__enter__()
                self._handles.append(mode)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        handles, self._handles = self._handles, []
        try:
            for h in reversed(handles):
                h.__exit__(*exc)
        finally:
            pop_active(self)  # no-op when already popped
            self._tracker.reset()
            self._active = False

    def _hooks_on_top(self) -> bool:
        """False inside someone else's saved-tensor hooks (e.g. activation checkpointing),
        where our pack never runs: recording recipes there would only cost time."""
        top = top_saved_tensors_hooks()
        return top is not None and top[0] is self._pair[0]

    # ------------------------------------------------------------ pack helpers

    def _input_handle(self, a: torch.Tensor, depth: int) -> Handle | None:
        """A handle for a recipe's input ``a``, or None when it cannot be had for free."""
        if self._tracker.is_static(a):
            return Kept(a)
        base = a._base if a._base is not None else a
        handle = self._table.get(base)
        if handle is None:
            handle = self._recipe_handle(base, depth + 1)
            if handle is None:
                return None
        return handle if a is base else View(handle, a, base)

    def _recipe_handle(self, t: torch.Tensor, depth: int = 0) -> Handle | None:
        rec = self._recipes.get(t)
        if rec is None or depth > _MAX_RECIPE_DEPTH:
            return None
        fn, args = rec
        resolved: list = []
        for a in args:
            if isinstance(a, torch.Tensor):
                h = self._input_handle(a, depth)
                if h is None:
                    return None
                resolved.append(h)
            else:
                resolved.append(a)
        return Recipe(fn, resolved, t)

    def _derived_handle(self, t: torch.Tensor) -> Handle | None:
        """A handle for a copy of a parameter (or any leaf), which is never quantized."""
        leaf, exact = parameter_source(t)
        if leaf is None:
            if t.grad_fn is None and not t.requires_grad:
                src = self._tracker.frozen_source(t)
                if src is not None:
                    return FromParameter(src, t)
            return None
        if exact:
            return FromParameter(leaf, t)
        return Kept(t) if self._tracker.is_static(leaf) else None

    # ------------------------------------------------------------ pack

    def _pack(self, t: torch.Tensor) -> Any:
        if is_dtensor(t):  # tensor parallel: stored through its local tensor
            return pack_dtensor(self, t)
        tracker = self._tracker
        if tracker.is_static(t) or t.dtype not in _CODEC_DTYPES:
            return Kept(t)  # float64, complex, integer and bool saves stay exact
        base = t._base
        key = base if base is not None and base.numel() == t.numel() else t
        fqn, kind = tracker.where()
        prod = tracker.producer(key)
        if prod is not None:
            kind = prod
        report = self.report
        handle = self._table.get(key)
        if handle is not None:
            report.record(fqn, kind, "dedup", 0, 0, 0)
            return handle if key is t else View(handle, t, key)

        # Most saves are outputs of ordinary ops, never copies of a parameter: one test of
        # the grad_fn's type spares them the walk of _derived_handle.
        fn = key.grad_fn
        handle = None
        if fn is None or type(fn).__name__ in _CHAIN_NODES:
            handle = self._derived_handle(key)
        if handle is not None:
            mode, stored = "rebuilt", 0
        else:
            handle, mode, stored = self._store(key, kind)
        self._table.put(key, handle)
        report.record(fqn, kind, mode, key.numel(), key.nbytes, stored)
        return handle if key is t else View(handle, t, key)

    def _store(self, key: torch.Tensor, kind: str) -> tuple[Handle, str, int]:
        """Store ``key`` as its kind's action says: (handle, mode, stored bytes).

        Stored bytes are held in the report until autograd drops the handle (with the
        graph), not until the tensor dies: a tensor that outlives the step is not held on
        our account."""
        plan = self.plan
        report = self.report
        action = plan.action(kind)
        if action == "keep" or key.numel() < plan.min_numel:
            nbytes = key.nbytes
            report.hold(nbytes)
            return HeldKept(key, report.release, nbytes), "kept", nbytes
        if plan.recompute:
            handle = self._recipe_handle(key)
            if handle is not None:
                return handle, "recomputed", 0
        spec = action if isinstance(action, QuantSpec) else plan.fallback
        if not isinstance(spec, QuantSpec):
            nbytes = key.nbytes
            report.hold(nbytes)
            return HeldKept(key, report.release, nbytes), "kept", nbytes
        dense = compact(key)
        if dense is not None:  # a broadcast: store its distinct elements only
            packed = quantize(dense, spec)
            nbytes = packed.nbytes
            report.hold(nbytes)
            inner = Quantized(packed, key, report.release, nbytes)
            return Expanded(inner, key.shape), "quantized", nbytes
        packed = quantize(key, spec)
        nbytes = packed.nbytes
        report.hold(nbytes)
        return Quantized(packed, key, report.release, nbytes), "quantized", nbytes


class _Popper:
    """Exit step that leaves this thread's active contexts (and, with the last active
    context of the process, removes the global module hooks)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: ActivationContext) -> None:
        self.ctx = ctx

    def __exit__(self, *exc: object) -> None:
        pop_active(self.ctx)


def quantize_activations(plan: ActivationPlan | None = None) -> ActivationContext:
    """Store tensors saved for backward as ``plan`` says (default: the paper's plan).

    Use as ``with agoq.quantize_activations(plan) as ctx: loss = model(x)``; backward may
    run inside or after the block, and the same context may be entered every step.
    ``ctx.report`` holds the exact byte accounting.
    """
    return ActivationContext(plan)
