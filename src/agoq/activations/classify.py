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

from .._compat import module_buffers, view_base
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
_CHAIN_NODES = _VIEW_NODES | _CAST_NODES


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
    if fn is None or type(fn).__name__ not in _CHAIN_NODES:  # most saves end here
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
    module is (FQN, kind, producer kind) and the static tensors of the models seen.

    Per module call the hooks resolve, once, where a save inside it belongs (the innermost
    module with a kind), so a pack only reads the top of a stack."""

    def __init__(self, plan: ActivationPlan) -> None:
        self.plan = plan
        self.stack: list[nn.Module] = []
        # Parallel to ``stack``: (FQN, kind) a save belongs to, and whether a rule named it.
        self._where: list[tuple[str, str, bool]] = []
        # id(module) -> (weak module, (fqn, kind, producer kind)); plain dict: a
        # WeakKeyDictionary lookup makes a weakref per call.
        self._info: dict[int, tuple[weakref.ref, tuple[str, str | None, str | None]]] = {}
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._statics: dict[int, weakref.ref] = {}
        self._by_shape: dict[tuple[int, ...], dict[int, weakref.ref]] = {}
        # id(tensor) -> (weak tensor, kind, strong): the kind a tensor has wherever it is
        # saved. Strong (a producer rule, an op that says what it is) beats the saving
        # module's rule; weak (a guess from the ops around it) only fills in for no rule.
        self._producers: dict[int, tuple[weakref.ref, str, bool]] = {}

    def set_plan(self, plan: ActivationPlan) -> None:
        """Use ``plan``'s rules from now on (kinds are resolved again)."""
        if plan is not self.plan:
            self.plan = plan
            # Forget the roots too, so their next forward names every module by its FQN
            # again (a module first seen without its root only gets its class name).
            self._info = {}
            self._roots = weakref.WeakSet()

    def reset(self) -> None:
        """Forget the running modules (at enter and exit of the context)."""
        self.stack.clear()
        self._where.clear()

    # ----------------------------------------------------------------- module hooks

    def _set_info(self, m: nn.Module, info: tuple[str, str | None, str | None]) -> None:
        key = id(m)
        table = self._info

        def drop(wr: weakref.ref) -> None:
            entry = table.get(key)
            if entry is not None and entry[0] is wr:
                del table[key]

        table[key] = (weakref.ref(m, drop), info)

    def _module_info(self, m: nn.Module) -> tuple[str, str | None, str | None]:
        entry = self._info.get(id(m))
        if entry is not None and entry[0]() is m:
            return entry[1]
        # A module outside every root seen (created on the fly): named by its class.
        name = type(m).__name__
        info = (name, self.plan.kind_of(name, m), None)
        self._set_info(m, info)
        return info

    def pre(self, module: nn.Module) -> None:
        """A module's forward starts."""
        if not self.stack:
            self._register_root(module)
        fqn, kind, _ = self._module_info(module)
        where = self._where
        if kind is not None:
            where.append((fqn, kind, True))
        elif where and where[-1][2]:
            where.append(where[-1])
        else:
            where.append((fqn, "other", False))
        self.stack.append(module)

    def post(self, module: nn.Module, output: Any) -> None:
        """A module's forward ended (or raised)."""
        stack, where = self.stack, self._where
        while stack:
            where.pop()
            if stack.pop() is module:
                break
        if isinstance(output, (tuple, list)) and output:
            output = output[0]  # e.g. a decoder layer returning (hidden_states, ...)
        if isinstance(output, torch.Tensor):
            entry = self._info.get(id(module))
            if entry is not None and entry[1][2] is not None and entry[0]() is module:
                self.tag(output, entry[1][2], True)

    def tag(self, t: torch.Tensor, kind: str, strong: bool) -> None:
        """Give tensor ``t`` ``kind`` wherever it is saved (see ``_producers``); a weak
        tag never replaces a strong one."""
        key = id(t)
        old = self._producers.get(key)
        if not strong and old is not None and old[2] and old[0]() is t:
            return
        self._producers[key] = (weakref.ref(t, self._forget(key)), kind, strong)

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
                entry = self._info.get(id(m))
                if entry is None or entry[0]() is not m:
                    info = (fqn, self.plan.kind_of(fqn, m), self.plan.producer_kind(fqn, m))
                    self._set_info(m, info)
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

    def where_named(self) -> tuple[str, str, bool]:
        """:meth:`where`, and whether a rule named that kind (not a fallback)."""
        where = self._where
        return where[-1] if where else ("<no module>", "other", False)

    def own_kind(self, m: nn.Module) -> str | None:
        """The kind a rule gives module ``m`` itself (None if no rule names it)."""
        return self._module_info(m)[1]

    def where(self) -> tuple[str, str]:
        """(FQN, kind) of the innermost module with a kind on the stack (else the
        innermost module's FQN and ``"other"``)."""
        where = self._where
        if where:
            w = where[-1]
            return w[0], w[1]
        return "<no module>", "other"

    def producer(self, t: torch.Tensor) -> tuple[str, bool] | None:
        """(kind, strong) a producer rule or an op gave ``t`` (e.g. the embedding's
        output), if any."""
        entry = self._producers.get(id(t))
        return (entry[1], entry[2]) if entry is not None and entry[0]() is t else None

    # ------------------------------------------------------------------- statics

    def is_static(self, t: torch.Tensor) -> bool:
        """A parameter or buffer (or a view of one) of a model seen in this context."""
        base = view_base(t)
        key = t if base is None else base
        wr = self._statics.get(id(key))
        if wr is not None and wr() is key:
            return True
        if base is not None and isinstance(t, nn.Parameter):
            return True
        # An activation has a grad_fn and is never a parameter (those are leaves): decided
        # without the (Python-level, slow) Parameter instance check.
        if key.grad_fn is not None:
            return False
        if isinstance(key, nn.Parameter):
            return True
        if key.requires_grad:
            return False
        # A buffer (re)assigned during this very forward: look at the running modules.
        for m in self.stack:
            for b in module_buffers(m).values():
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
        base = t if (v := view_base(t)) is None else v
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
