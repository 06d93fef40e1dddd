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
from torch import nn

from .._compat import has_own_hooks, no_static_hooks_filtering, top_saved_tensors_hooks, view_base
from ..memory import MemoryReport
from ..quant import QuantSpec, quantize
from ..quant.codec import is_dtensor
from .classify import _CHAIN_NODES, ModuleTracker, parameter_source
from .dtensor import pack_dtensor
from .hooks import hook_pair, pop_active, push_active
from .plan import ActivationPlan
from .rebuild import ModuleCall, cached_role
from .recompute import RecipeMode, Recipes, cast
from .store import (
    Expanded,
    FromParameter,
    Handle,
    HeldKept,
    Kept,
    Quantized,
    Recipe,
    Replayed,
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
        # The rebuilt module running now (its saves go to it), its input and stack depth.
        self._call: ModuleCall | None = None
        self._call_x: torch.Tensor | None = None
        self._call_depth = 0
        self._call_seen: set[int] = set()
        self._call_role: str | None = None
        self._call_kind = "other"
        # The kind of what the op running now saves (see op()); attention ops run so far;
        # forwards of a root module so far; and per norm parent (forward, attention ops)
        # at its last norm (see _norm_tag).
        self._op_kind: tuple[str, bool] | None = None
        self._attention_calls = 0
        self._forwards = 0
        self._norm_parents: dict[int, tuple[int, int]] = {}

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
                mode = RecipeMode(self._recipes, self._recording, self)
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
            self._call = self._call_x = None
            self._active = False

    def _hooks_on_top(self) -> bool:
        """False inside someone else's saved-tensor hooks (e.g. activation checkpointing),
        where our pack never runs: recording recipes there would only cost time."""
        top = top_saved_tensors_hooks()
        return top is not None and top[0] is self._pair[0]

    def _recording(self) -> bool:
        """Whether op-level recipes are recorded now: our hooks on top, and not inside a
        rebuilt module (whose replay runs its forward without the recipe mode)."""
        return self._call is None and self._hooks_on_top()

    # ------------------------------------------------------------ module hooks

    def _module_pre(self, module: torch.nn.Module, args: tuple) -> None:
        """A module's forward starts: track it; start a rebuilt call for a norm or
        activation module (its input is stored now, its own saves go to the call)."""
        tracker = self._tracker
        if not tracker.stack:
            self._forwards += 1
        tracker.pre(module)
        if (
            self._call is not None
            or len(args) != 1
            or not self.plan.recompute
            or not torch.is_grad_enabled()
        ):
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dtype not in _CODEC_DTYPES:
            return
        if has_own_hooks(module):  # a replay of forward() would skip them
            return
        role = cached_role(module, x)
        if role is None or not self._hooks_on_top():
            return
        if not x.requires_grad and not any(p.requires_grad for p in module.parameters()):
            return
        fqn, kind, named = tracker.where_named()
        own = tracker.own_kind(module)
        if own is not None:
            kind = own
        elif role == "norm":
            kind = "qk_norm_input" if named and kind == "attn_internals" else "norm_input"
        elif not named:
            kind = "swiglu_input"
        v = view_base(x)
        base = v if v is not None and v.numel() == x.numel() else x
        prod = tracker.producer(base)
        if prod is not None and prod[1]:  # e.g. the embedding's output: its kind wins
            kind = prod[0]
        handle = self._pack(x, kind)
        self._call = ModuleCall(module, handle, x)
        self._call_x = x
        self._call_role = role
        self._call_kind = kind
        self._call_depth = len(tracker.stack)
        self._call_seen = set()

    def _module_post(self, module: torch.nn.Module, output: Any) -> None:
        """A module's forward ended: the rebuilt call ends with it; its output gets a
        recipe (run the module again, without grad, from the stored input)."""
        tracker = self._tracker
        call = self._call
        if call is not None and call.module is module and len(tracker.stack) == self._call_depth:
            x = self._call_x
            self._call = self._call_x = None
            if isinstance(output, torch.Tensor) and output.requires_grad and x is not None:
                self._recipes.add(output, call.output, (x,))
                if self._call_role == "norm":
                    tracker.tag(output, self._norm_tag(), False)
                else:  # an MLP activation's output: rebuilt wherever it is saved
                    tracker.tag(output, "swiglu_input", False)
        tracker.post(module, output)

    def _norm_tag(self) -> str:
        """What a norm's output feeds, from where the norm sits (for models no rule
        names): the final norm of a model trunk (a module holding the layer list) feeds
        the LM head; in a block, the first norm feeds attention, a norm after an attention
        op the MLP."""
        stack = self._tracker.stack
        if len(stack) < 2:
            return "attn_proj_input"
        parent = stack[-2]
        if any(isinstance(c, (nn.ModuleList, nn.ModuleDict)) for c in parent.children()):
            return "lm_head_input"
        last = self._norm_parents.get(id(parent))
        self._norm_parents[id(parent)] = (self._forwards, self._attention_calls)
        if last is not None and last[0] == self._forwards and last[1] != self._attention_calls:
            return "mlp_up_input"
        return "attn_proj_input"

    # Tagger (see recompute.RecipeMode): what the ops say about the tensors they make.
    def tag(self, t: torch.Tensor, kind: str, strong: bool) -> None:
        """Give ``t`` ``kind`` wherever it is saved."""
        self._tracker.tag(t, kind, strong)

    def tag_of(self, t: torch.Tensor) -> tuple[str, bool] | None:
        """The tag of ``t`` (kind, strong), if any."""
        return self._tracker.producer(t)

    def stored(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (or the tensor it views) is stored in this context already."""
        base = t if (v := view_base(t)) is None else v
        return self._table.get(base) is not None

    def op(self, kind: str, strong: bool) -> _OpKind:
        """While an op runs: what it saves is ``kind`` (strong: over the module rule)."""
        if kind == "attn_internals":
            self._attention_calls += 1
        return _OpKind(self, (kind, strong))

    def _replayed(self, call: ModuleCall, t: torch.Tensor) -> Handle:
        """A save made inside a rebuilt module's forward: 0 bytes, replayed in backward."""
        index = call.save(t)
        if self._tracker.is_static(t):
            return Kept(t)
        base = t if (v := view_base(t)) is None else v
        fqn, kind = self._tracker.where()[0], self._call_kind
        seen = id(base) in self._call_seen or self._table.get(base) is not None
        self._call_seen.add(id(base))
        if seen:
            self.report.record(fqn, kind, "dedup", 0, 0, 0)
        else:
            self.report.record(fqn, kind, "recomputed", t.numel(), t.nbytes, 0)
        return Replayed(call, index, t)

    # ------------------------------------------------------------ pack helpers

    def _input_handle(self, a: torch.Tensor, depth: int) -> Handle | None:
        """A handle for a recipe's input ``a``, or None when it cannot be had for free."""
        if self._tracker.is_static(a):
            return Kept(a)
        base = a if (v := view_base(a)) is None else v
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

    def _pack(self, t: torch.Tensor, kind: str | None = None) -> Any:
        call = self._call
        if call is not None and kind is None:
            return self._replayed(call, t)
        if is_dtensor(t):  # tensor parallel: stored through its local tensor
            return pack_dtensor(self, t)
        tracker = self._tracker
        if tracker.is_static(t) or t.dtype not in _CODEC_DTYPES:
            return Kept(t)  # float64, complex, integer and bool saves stay exact
        base = view_base(t)
        key = base if base is not None and base.numel() == t.numel() else t
        fqn, where_kind, named = tracker.where_named()
        fn = key.grad_fn
        prod = tracker.producer(key)
        if fn is not None and self.plan.recompute and type(fn).__name__ == "ToCopyBackward0":
            # Autocast's cast of a tensor with a recipe (a norm's output cast for the GEMM
            # that follows): rebuilt as the cast of that tensor, and of its kind.
            src = self._recipes.source_of(fn.next_functions[0][0])
            if src is not None and src.shape == key.shape and self._recipes.get(key) is None:
                self._recipes.add(key, cast, (src, key.dtype))
                prod = prod or tracker.producer(src)
        if prod is not None and (prod[1] or (kind is None and not named)):
            kind = prod[0]
        elif kind is None:
            kind = where_kind
            op = self._op_kind
            if op is not None and (op[1] or not named):
                kind = op[0]
        report = self.report
        handle = self._table.get(key)
        if handle is not None:
            report.record(fqn, kind, "dedup", 0, 0, 0)
            return handle if key is t else View(handle, t, key)

        # Most saves are outputs of ordinary ops, never copies of a parameter: one test of
        # the grad_fn's type spares them the walk of _derived_handle.
        handle = None
        if fn is None or type(fn).__name__ in _CHAIN_NODES:
            handle = self._derived_handle(key)
        if handle is not None:
            mode, stored, fmt = "rebuilt", 0, ""
        else:
            handle, mode, stored, fmt = self._store(key, kind)
        self._table.put(key, handle)
        report.record(fqn, kind, mode, key.numel(), key.nbytes, stored, fmt)
        return handle if key is t else View(handle, t, key)

    def _store(self, key: torch.Tensor, kind: str) -> tuple[Handle, str, int, str]:
        """Store ``key`` as its kind's action says: (handle, mode, stored bytes, format).

        Stored bytes are held in the report until autograd drops the handle (with the
        graph), not until the tensor dies: a tensor that outlives the step is not held on
        our account."""
        plan = self.plan
        report = self.report
        action = plan.action(kind)
        if action == "keep" or key.numel() < plan.min_numel:
            nbytes = key.nbytes
            report.hold(nbytes)
            return HeldKept(key, report.release, nbytes), "kept", nbytes, _dtype_name(key)
        if plan.recompute:
            handle = self._recipe_handle(key)
            if handle is not None:
                return handle, "recomputed", 0, ""
        spec = action if isinstance(action, QuantSpec) else plan.fallback
        if not isinstance(spec, QuantSpec):
            nbytes = key.nbytes
            report.hold(nbytes)
            return HeldKept(key, report.release, nbytes), "kept", nbytes, _dtype_name(key)
        dense = compact(key)
        if dense is not None:  # a broadcast: store its distinct elements only
            packed = quantize(dense, spec)
            nbytes = packed.nbytes
            report.hold(nbytes)
            inner = Quantized(packed, key, report.release, nbytes)
            return Expanded(inner, key.shape), "quantized", nbytes, spec_label(spec)
        packed = quantize(key, spec)
        nbytes = packed.nbytes
        report.hold(nbytes)
        return Quantized(packed, key, report.release, nbytes), "quantized", nbytes, spec_label(spec)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def spec_label(spec: QuantSpec) -> str:
    """A short name of a spec for reports, e.g. ``fp4_e2m1/128`` or ``int8/128 bf16-scales``."""
    name = f"int{spec.bits}" if spec.format == "int" else spec.format
    scales = " bf16-scales" if spec.scale_dtype == torch.bfloat16 else ""
    return f"{name}/{spec.block}{scales}"


class _OpKind:
    """Context manager of :meth:`ActivationContext.op`."""

    __slots__ = ("ctx", "kind", "prev")

    def __init__(self, ctx: ActivationContext, kind: tuple[str, bool]) -> None:
        self.ctx, self.kind, self.prev = ctx, kind, None

    def __enter__(self) -> None:
        self.prev, self.ctx._op_kind = self.ctx._op_kind, self.kind

    def __exit__(self, *exc: object) -> None:
        self.ctx._op_kind = self.prev


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
