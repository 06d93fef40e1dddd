"""What a saved tensor is: which module saves it (FQN, kind), and whether it is static.

:class:`ModuleTracker` follows the modules running in the thread that entered a context
(the hooks dispatch only to the calling thread's active context, so another thread's
forward never shifts the stack). A tensor is *static* when it is a parameter or buffer of
a model seen in the context, looked up live (a buffer reassigned between steps, or during
the forward, is still a buffer), or a view of one. :func:`parameter_source` recognises a
*copy* of a parameter (autocast's low-precision weight, FSDP2's unsharded copy cast): it is
rebuilt from the parameter, never quantized.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .plan import ActivationPlan

# Autograd nodes that only change dtype or geometry: a chain of them from a parameter's
# AccumulateGrad is a copy or view of the parameter.
_VIEW_NODES = frozenset(
    {
        "ViewBackward0",
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "AliasBackward0",
        "UnsafeViewBackward0",
        "AsStridedBackward0",
        "SliceBackward0",
        "SelectBackward0",
    }
)
_CAST_NODES = frozenset({"ToCopyBackward0"})


def _dense(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in sorted(
        ((sz, st) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1),
        key=lambda d: d[1],
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def parameter_source(t: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(leaf, exact) when ``t`` is a cast of a leaf tensor that requires grad (a trainable
    parameter), optionally viewed: ``exact`` says the copy can be rebuilt bit for bit as
    ``leaf.to(t.dtype)`` viewed with ``t``'s geometry. (None, False) otherwise."""
    fn = t.grad_fn
    if fn is None:
        return None, False
    casts = 0
    cast_on_leaf = False
    for _ in range(8):
        name = type(fn).__name__
        if name == "AccumulateGrad":
            leaf = fn.variable
            # The rebuild reads the cast's storage layout: exact when the cast was taken of
            # the contiguous leaf itself (any memory format then gives the same layout) and
            # t views it.
            exact = (
                casts == 1
                and cast_on_leaf
                and leaf.is_contiguous()
                and t.untyped_storage().nbytes() == leaf.numel() * t.element_size()
            )
            return leaf, exact
        if name in _CAST_NODES:
            casts += 1
        elif name not in _VIEW_NODES:
            return None, False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return None, False
        cast_on_leaf = name in _CAST_NODES
        fn = nxt[0]
    return None, False


class ModuleTracker:
    """The module stack of one context in the thread that entered it, plus what each
    module is (FQN, kind, producer kind) and the static tensors of the models seen."""

    def __init__(self, plan: ActivationPlan) -> None:
        self.plan = plan
        self.stack: list[nn.Module] = []
        self._info: weakref.WeakKeyDictionary[nn.Module, tuple[str, str | None, str | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._statics: dict[int, weakref.ref] = {}
        self._by_shape: dict[tuple[int, ...], dict[int, weakref.ref]] = {}
        self._producers: dict[int, tuple[weakref.ref, str]] = {}

    def set_plan(self, plan: ActivationPlan) -> None:
        """Use ``plan``'s rules from now on (kinds are resolved again)."""
        if plan is not self.plan:
            self.plan = plan
            # Forget the roots too, so their next forward names every module by its FQN
            # again (a module first seen without its root only gets its class name).
            self._info = weakref.WeakKeyDictionary()
            self._roots = weakref.WeakSet()

    # ----------------------------------------------------------------- module hooks

    def pre(self, module: nn.Module) -> None:
        """A module's forward starts."""
        if not self.stack:
            self._register_root(module)
        self.stack.append(module)

    def post(self, module: nn.Module, output: Any) -> None:
        """A module's forward ended (or raised)."""
        while self.stack:
            if self.stack.pop() is module:
                break
        info = self._info.get(module)
        if info is not None and info[2] is not None and isinstance(output, torch.Tensor):
            key = id(output)
            self._producers[key] = (weakref.ref(output, self._forget(key)), info[2])

    def _forget(self, key: int):
        table = self._producers

        def drop(wr: weakref.ref) -> None:
            entry = table.get(key)
            if entry is not None and entry[0] is wr:
                del table[key]

        return drop

    def _register_root(self, root: nn.Module) -> None:
        # Run at every forward of an outermost module: its parameters and buffers are read
        # afresh, so one reassigned between steps is still recognised as static.
        if root not in self._roots:
            self._roots.add(root)
            for fqn, m in root.named_modules():
                if m not in self._info:
                    self._info[m] = (
                        fqn,
                        self.plan.kind_of(fqn, m),
                        self.plan.producer_kind(fqn, m),
                    )
        for t in [*root.parameters(), *root.buffers()]:
            self._add_static(t)

    def _add_static(self, t: torch.Tensor) -> None:
        key = id(t)
        wr = self._statics.get(key)
        if wr is not None and wr() is t:
            return
        wr = weakref.ref(t, self._drop_static(key))
        self._statics[key] = wr
        self._by_shape.setdefault(tuple(t.shape), {})[key] = wr

    def _drop_static(self, key: int):
        statics, by_shape = self._statics, self._by_shape

        def drop(wr: weakref.ref) -> None:
            if statics.get(key) is wr:
                del statics[key]
            for refs in by_shape.values():
                if refs.get(key) is wr:
                    del refs[key]

        return drop

    def where(self) -> tuple[str, str]:
        """(FQN, kind) of the innermost module with a kind on the stack."""
        fqn = None
        plan = self.plan
        for m in reversed(self.stack):
            info = self._info.get(m)
            if info is None:
                info = (type(m).__name__, plan.kind_of(type(m).__name__, m), None)
                self._info[m] = info
            if fqn is None:
                fqn = info[0]
            if info[1] is not None:
                return info[0], info[1]
        return (fqn if fqn is not None else "<no module>"), "other"

    def producer(self, t: torch.Tensor) -> str | None:
        """The kind a producer rule gave ``t`` (e.g. the embedding's output), if any."""
        entry = self._producers.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    # ------------------------------------------------------------------- statics

    def is_static(self, t: torch.Tensor) -> bool:
        """A parameter or buffer (or a view of one) of a model seen in this context."""
        if isinstance(t, nn.Parameter):
            return True
        base = t._base
        if base is not None and isinstance(base, nn.Parameter):
            return True
        key = base if base is not None else t
        wr = self._statics.get(id(key))
        if wr is not None and wr() is key:
            return True
        if key.grad_fn is not None or key.requires_grad:
            return False
        # A buffer (re)assigned during this very forward: look at the running modules.
        for m in self.stack:
            for b in m._buffers.values():
                if b is key:
                    self._add_static(b)
                    return True
        return False

    def static_shapes(self) -> set[tuple[int, ...]]:
        """Shapes of the parameters and buffers of the models seen in this context."""
        return {shape for shape, refs in self._by_shape.items() if refs}

    def frozen_source(self, t: torch.Tensor) -> torch.Tensor | None:
        """A static tensor that ``t`` (no autograd history) is an exact cast of, e.g.
        autocast's copy of a frozen weight or of a buffer; None otherwise."""
        base = t._base if t._base is not None else t
        cands = self._by_shape.get(tuple(base.shape))
        if not cands or base.grad_fn is not None:
            return None
        for wr in list(cands.values()):
            s = wr()
            if s is None or s.dtype == base.dtype or not s.is_floating_point():
                continue
            if s.device == base.device and _dense(s) and base.stride() == s.stride():
                with torch.no_grad():
                    if torch.equal(s.detach().to(base.dtype), base):
                        return s
        return None
