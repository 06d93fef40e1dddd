"""quantize_activations(plan): store tensors saved for backward in the plan's formats.

The context installs, while active:

* a ``saved_tensors_hooks`` pair: pack stores each saved floating activation as the plan
  says (quantized, kept, or as a recipe to rebuild it), unpack rebuilds it;
* global module forward hooks, so pack knows which module (FQN, kind) is saving;
* a TorchFunctionMode recording recipes for cheap ops (see :mod:`.recompute`).

Design rules: parameters, buffers and views of them are never touched; a tensor saved
several times is stored once (dedupe keyed on weak references, never on ``data_ptr``);
unpack never frees anything, so it can run any number of times (``retain_graph``,
zero-bubble split backward); memory is released when autograd drops the saved slot.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..memory import MemoryReport
from ..quant import Packed, QuantSpec, dequantize, quantize
from .compiled import ACTIVE, hook_pair, pop_active, push_active
from .plan import ActivationPlan
from .recompute import RecipeMode, Recipes

# ------------------------------------------------------------------- stored handles


class _Handle:
    """Something unpack can turn back into a tensor (any number of times)."""

    __slots__ = ("_last", "__weakref__")

    def __init__(self) -> None:
        self._last: weakref.ref | None = None

    def get(self) -> torch.Tensor:
        # Several GEMMs unpack the same stored tensor back to back: reuse the rebuilt tensor
        # while a previous unpack still holds it, never keep it alive ourselves.
        last = self._last() if self._last is not None else None
        if last is not None:
            return last
        out = self._build()
        self._last = weakref.ref(out)
        return out

    def _build(self) -> torch.Tensor:
        raise NotImplementedError


class _Quantized(_Handle):
    __slots__ = ("packed",)

    def __init__(self, packed: Packed) -> None:
        super().__init__()
        self.packed = packed

    def _build(self) -> torch.Tensor:
        return dequantize(self.packed)


class _Kept(_Handle):
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor

    def get(self) -> torch.Tensor:
        return self.tensor


class _Recipe(_Handle):
    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable, args: list) -> None:
        super().__init__()
        self.fn = fn
        self.args = args

    def _build(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(*[a.get() if isinstance(a, _Handle) else a for a in self.args])


class _View(_Handle):
    """A view (e.g. the 2-D reshape a Linear saves) of a stored base tensor."""

    __slots__ = ("base", "size", "stride", "offset")

    def __init__(self, base: _Handle, t: torch.Tensor, base_t: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset() - base_t.storage_offset()

    def get(self) -> torch.Tensor:
        return self.base.get().as_strided(self.size, self.stride, self.offset)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -------------------------------------------------------------------- the context


class ActivationContext:
    """The object ``quantize_activations(plan)`` returns; use it as a context manager.

    ``report`` accumulates a :class:`~agoq.memory.MemoryReport` over every forward run
    inside the context (``report.clear()`` to start over).
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
        self._stack: list[nn.Module] = []
        self._info: weakref.WeakKeyDictionary[nn.Module, tuple[str, str | None, str | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._statics: dict[int, tuple[weakref.ref]] = {}
        self._producers: dict[int, tuple[weakref.ref, str]] = {}
        self._cache: dict[int, tuple[weakref.ref, _Handle | None]] = {}
        self._recipes = Recipes()
        self._handles: list[Any] = []
        self._active = 0
        self._pair: tuple = ()

    # ----------------------------------------------------------- enter / exit

    def __enter__(self) -> ActivationContext:
        if self._active:
            raise RuntimeError("this quantize_activations context is already active")
        _install_module_hooks()
        self._pair = hook_pair(self.plan)
        hooks = torch.autograd.graph.saved_tensors_hooks(*self._pair)
        hooks.__enter__()
        push_active(self)
        # "no_static": the hooks also see a compiled region's non-static inputs (a block's
        # input, saved for its first norm), never its parameters or buffers.
        filtering = torch._functorch.config.patch(saved_tensors_hooks_filtering_mode="no_static")
        filtering.__enter__()
        self._handles = [hooks, filtering]
        if self.plan.recompute:
            mode = RecipeMode(self._recipes, self._hooks_on_top)
            mode.__enter__()
            self._handles.append(mode)
        self._active = 1
        return self

    def __exit__(self, *exc: object) -> None:
        handles, self._handles = self._handles, []
        for h in reversed(handles):
            if hasattr(h, "remove"):
                h.remove()
            else:
                h.__exit__(*exc)
        pop_active(self)
        self._stack.clear()
        self._active = 0

    def _hooks_on_top(self) -> bool:
        """False inside someone else's saved-tensor hooks (e.g. activation checkpointing),
        where our pack never runs: recording recipes there would only cost time."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        return top is not None and top[0] is self._pair[0]

    # ------------------------------------------------------------ module stack

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if not self._stack and module not in self._roots:
            self._register_root(module)
        self._stack.append(module)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        while self._stack:
            if self._stack.pop() is module:
                break
        info = self._info.get(module)
        if info is not None and info[2] is not None and isinstance(output, torch.Tensor):
            key = id(output)
            self._producers[key] = (
                weakref.ref(output, self._forget(self._producers, key)),
                info[2],
            )

    def _register_root(self, root: nn.Module) -> None:
        self._roots.add(root)
        for fqn, m in root.named_modules():
            if m not in self._info:
                self._info[m] = (fqn, self.plan.kind_of(fqn, m), self.plan.producer_kind(fqn, m))
        for t in list(root.parameters()) + list(root.buffers()):
            self._statics[id(t)] = (weakref.ref(t, self._forget(self._statics, id(t))),)

    def _where(self) -> tuple[str, str]:
        """(FQN, kind) of the innermost module with a kind on the stack."""
        fqn = None
        for m in reversed(self._stack):
            info = self._info.get(m)
            if info is None:
                info = (type(m).__name__, self.plan.kind_of(type(m).__name__, m), None)
                self._info[m] = info
            if fqn is None:
                fqn = info[0]
            if info[1] is not None:
                return info[0], info[1]
        return (fqn if fqn is not None else "<no module>"), "other"

    @staticmethod
    def _forget(table: dict, key: int) -> Callable[[weakref.ref], None]:
        def drop(wr: weakref.ref) -> None:
            entry = table.get(key)
            if entry is not None and entry[0] is wr:
                del table[key]

        return drop

    # ------------------------------------------------------------ pack / unpack

    def _is_static(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter):
            return True
        base = t._base
        if base is not None and isinstance(base, nn.Parameter):
            return True
        key = base if base is not None else t
        entry = self._statics.get(id(key))
        return entry is not None and entry[0]() is key

    def _lookup(self, t: torch.Tensor) -> tuple[bool, _Handle | None]:
        entry = self._cache.get(id(t))
        if entry is None or entry[0]() is not t:
            return False, None
        return True, entry[1]

    def _remember(self, t: torch.Tensor, handle: _Handle | None) -> None:
        key = id(t)
        self._cache[key] = (weakref.ref(t, self._forget(self._cache, key)), handle)

    def _input_handle(self, a: torch.Tensor, depth: int) -> _Handle | None:
        if self._is_static(a):
            return _Kept(a)
        base = a._base if a._base is not None else a
        found, handle = self._lookup(base)
        if found:
            handle = handle if handle is not None else _Kept(base)
        else:
            handle = self._recipe_handle(base, depth + 1)
            if handle is None:
                return None
        return handle if a is base else _View(handle, a, base)

    def _recipe_handle(self, t: torch.Tensor, depth: int = 0) -> _Handle | None:
        rec = self._recipes.get(t)
        if rec is None or depth > 16:
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
        return _Recipe(fn, resolved)

    def _pack(self, t: torch.Tensor) -> Any:
        if not t.is_floating_point() or t.is_complex() or self._is_static(t):
            return t
        base = t._base
        key = base if base is not None and base.numel() == t.numel() else t
        fqn, kind = self._where()
        prod = self._producers.get(id(key))
        if prod is not None and prod[0]() is key:
            kind = prod[1]
        plan = self.plan
        action = plan.action(kind)
        found, handle = self._lookup(key)
        if found:
            self.report.record(fqn, kind, "dedup", 0, 0, 0)
            if handle is None:
                return t
            return handle if key is t else _View(handle, t, key)

        if t.numel() < plan.min_numel or action == "keep":
            self._keep(key, fqn, kind)
            return t
        handle = self._recipe_handle(key) if plan.recompute else None
        if handle is not None:
            mode, stored = "recomputed", 0
        else:
            spec = action if isinstance(action, QuantSpec) else plan.fallback
            if not isinstance(spec, QuantSpec):
                self._keep(key, fqn, kind)
                return t
            packed = quantize(key, spec)
            handle, mode, stored = _Quantized(packed), "quantized", packed.nbytes
        self._remember(key, handle)
        self.report.record(fqn, kind, mode, key.numel(), _nbytes(key), stored)
        self._hold(handle, stored)
        return handle if key is t else _View(handle, t, key)

    def _keep(self, key: torch.Tensor, fqn: str, kind: str) -> None:
        self._remember(key, None)
        self.report.record(fqn, kind, "kept", key.numel(), _nbytes(key), _nbytes(key))
        self._hold(key, _nbytes(key))

    def _hold(self, owner: object, nbytes: int) -> None:
        if nbytes:
            self.report.hold(nbytes)
            weakref.finalize(owner, self.report.release, nbytes)


_MODULE_HOOKS: list = []


def _global_pre_hook(module: nn.Module, args: Any) -> None:
    # Checked first so dynamo folds the hook away inside compiled regions (no guard on the
    # active contexts, no recompilation when a new context is entered).
    if torch.compiler.is_compiling() or not ACTIVE:
        return
    ACTIVE[-1]._pre_hook(module, args)


def _global_post_hook(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling() or not ACTIVE:
        return
    ACTIVE[-1]._post_hook(module, args, output)


def _install_module_hooks() -> None:
    """Register the global module hooks once per process: dynamo guards on the keys of the
    global hook dicts, so re-registering per context would recompile every compiled region.
    With no active context each hook is a check of an empty list."""
    if not _MODULE_HOOKS:
        from torch.nn.modules import module as nn_module

        _MODULE_HOOKS.append(nn_module.register_module_forward_pre_hook(_global_pre_hook))
        _MODULE_HOOKS.append(
            nn_module.register_module_forward_hook(_global_post_hook, always_call=True)
        )


def quantize_activations(plan: ActivationPlan | None = None) -> ActivationContext:
    """Store tensors saved for backward as ``plan`` says (default: the paper's plan).

    Use as ``with agoq.quantize_activations(plan) as ctx: loss = model(x)``; backward may
    run inside or after the block. ``ctx.report`` holds the exact byte accounting.
    """
    return ActivationContext(plan)
