"""Handles for saved tensors: what the pack hook hands autograd, and unpack turns back.

Every handle checks at unpack that the tensors it depends on were not modified in place
since they were saved. PyTorch skips its own saved-version check whenever saved-tensor
hooks are active, so without this an in-place edit after the save would silently change
the gradient. The message is autograd's own, so users see the error they know.

A quantized handle holds only a weak reference to the original tensor: while the original
is alive its version is checked; once it is gone nothing can modify it any more, and the
stored copy holds the values it had when it was saved, which is what the forward used.

Nothing here keeps a saved tensor alive longer than autograd keeps its handle, and unpack
never frees anything, so it can run any number of times (``retain_graph``, zero-bubble).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._compat import tensor_version
from ..quant import Packed, dequantize


def inplace_error(t: torch.Tensor, saved: int) -> RuntimeError:
    """The error autograd raises when a saved tensor was modified in place."""
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{t.type()} {list(t.shape)}] is at version {tensor_version(t)}; "
        f"expected version {saved} instead. (Detected by agoq: PyTorch skips its own check "
        "while saved-tensor hooks are active.) Hint: do not modify a tensor in place after "
        "an operation saved it for backward, or clone it first."
    )


def _give_back(handle: object) -> None:
    """Hand a counted handle's bytes back to the report (from ``__del__``: cheaper than a
    weakref.finalize per handle, and it runs at the same moment, when autograd drops the
    graph that holds the handle)."""
    try:
        on_free = handle._on_free
    except AttributeError:  # __init__ did not run
        return
    if on_free is not None:
        on_free(handle._nbytes)


class Handle:
    """Something unpack turns back into a tensor (any number of times)."""

    __slots__ = ("__weakref__",)

    def get(self) -> torch.Tensor:
        """The saved tensor's value; raises if a tensor it came from changed in place."""
        raise NotImplementedError


class Kept(Handle):
    """A tensor stored untouched (held strongly, as autograd would)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = tensor_version(tensor)

    def get(self) -> torch.Tensor:  # noqa: D102
        t = self.tensor
        if tensor_version(t) != self.version:
            raise inplace_error(t, self.version)
        return t


class HeldKept(Kept):
    """A kept tensor counted in the report's live bytes until autograd drops the handle."""

    __slots__ = ("_on_free", "_nbytes")

    def __init__(self, tensor: torch.Tensor, on_free: Callable[[int], None], nbytes: int) -> None:
        self.tensor = tensor
        self.version = tensor_version(tensor)
        self._on_free = on_free
        self._nbytes = nbytes

    def __del__(self) -> None:
        _give_back(self)


class _Built(Handle):
    """A handle whose tensor is rebuilt at unpack; reuses the rebuilt tensor while a
    previous unpack still holds it (several GEMMs unpack the same input back to back)."""

    __slots__ = ("_last", "_source", "_version")

    def __init__(self, source: torch.Tensor | None) -> None:
        self._last: weakref.ref | None = None
        if source is not None:
            self._source: weakref.ref | None = weakref.ref(source)
            self._version = tensor_version(source)
        else:
            self._source = None
            self._version = 0

    def get(self) -> torch.Tensor:  # noqa: D102
        src = self._source
        if src is not None:
            s = src()
            if s is not None and tensor_version(s) != self._version:
                raise inplace_error(s, self._version)
        last = self._last
        if last is not None:
            out = last()
            if out is not None and tensor_version(out) == 0:
                return out
        out = self._build()
        self._last = weakref.ref(out)
        return out

    def _build(self) -> torch.Tensor:
        raise NotImplementedError


class Quantized(_Built):
    """A tensor stored through the codec; with ``on_free``, its stored bytes are handed
    back (``on_free(nbytes)``) when autograd drops the handle."""

    __slots__ = ("packed", "_on_free", "_nbytes")

    def __init__(
        self,
        packed: Packed,
        source: torch.Tensor,
        on_free: Callable[[int], None] | None = None,
        nbytes: int = 0,
    ) -> None:
        super().__init__(source)
        self.packed = packed
        self._on_free = on_free
        self._nbytes = nbytes

    def __del__(self) -> None:
        _give_back(self)

    def _build(self) -> torch.Tensor:
        return dequantize(self.packed)


class Recipe(_Built):
    """A cheap op's output rebuilt from its (stored) inputs: ``fn(*args)``."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable, args: list, source: torch.Tensor) -> None:
        super().__init__(source)
        self.fn = fn
        self.args = args

    def _build(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(*[a.get() if isinstance(a, Handle) else a for a in self.args])


class Replayed(_Built):
    """A tensor a rebuilt module's forward saved: the ``index``-th save of ``call``
    (an :class:`~agoq.activations.rebuild.ModuleCall`), replayed from its stored input."""

    __slots__ = ("call", "index")

    def __init__(self, call: Any, index: int, source: torch.Tensor) -> None:
        super().__init__(source)
        self.call = call
        self.index = index

    def _build(self) -> torch.Tensor:
        return self.call.value(self.index)


class FromParameter(_Built):
    """A copy of a parameter (autocast's cast, a view of it): stores nothing and rebuilds
    it exactly from the parameter, whose version is checked like a saved tensor's."""

    __slots__ = ("param", "param_version", "dtype", "size", "stride", "offset")

    def __init__(self, param: torch.Tensor, t: torch.Tensor) -> None:
        super().__init__(t)
        self.param = param
        self.param_version = tensor_version(param)
        self.dtype = t.dtype
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def get(self) -> torch.Tensor:  # noqa: D102
        p = self.param
        if tensor_version(p) != self.param_version:  # also when a rebuilt copy is reused
            raise inplace_error(p, self.param_version)
        return super().get()

    def _build(self) -> torch.Tensor:
        with torch.no_grad():
            base = self.param.detach().to(self.dtype, copy=True)
        return base.as_strided(self.size, self.stride, self.offset)


class View(Handle):
    """A view (e.g. the 2-D reshape a Linear saves) of a stored base tensor."""

    __slots__ = ("base", "size", "stride", "offset")

    def __init__(self, base: Handle, t: torch.Tensor, base_t: torch.Tensor) -> None:
        self.base = base
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset() - base_t.storage_offset()

    def get(self) -> torch.Tensor:  # noqa: D102
        return self.base.get().as_strided(self.size, self.stride, self.offset)


class Expanded(Handle):
    """A broadcast (stride-0) tensor: its distinct elements are stored, then expanded."""

    __slots__ = ("base", "size")

    def __init__(self, base: Handle, size: torch.Size) -> None:
        self.base = base
        self.size = size

    def get(self) -> torch.Tensor:  # noqa: D102
        return self.base.get().expand(self.size)


def compact(t: torch.Tensor) -> torch.Tensor | None:
    """The distinct elements of an expanded tensor (size 1 where the stride is 0), or None
    when ``t`` has no stride-0 dimension of size > 1."""
    strides = t.stride()
    if 0 not in strides:  # the common case, without a Python loop over the dims
        return None
    idx: list[Any] = [slice(None)] * t.dim()
    found = False
    for d, (size, stride) in enumerate(zip(t.shape, strides, strict=True)):
        if stride == 0 and size > 1:
            idx[d] = slice(0, 1)
            found = True
    return t[tuple(idx)] if found else None


class SaveTable:
    """Tensors already stored in this context: tensor -> handle, keyed by the tensor's
    identity *and* its version, holding neither strongly. A tensor that lives across steps
    (a persistent buffer refilled in place) is therefore stored anew once it changed, and
    an entry is void once its tensor or its handle (with the graph) is gone.

    Void entries are swept when the table has doubled since the last sweep, instead of
    by a weakref callback per entry: an entry holds nothing but two weak references, and
    the callbacks (a closure each, two calls at death) were a good part of a pack's cost."""

    _MIN_SWEEP = 1024

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}
        self._sweep_at = self._MIN_SWEEP

    def get(self, t: torch.Tensor) -> Handle | None:
        """The live handle stored for this very tensor at its current version."""
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != tensor_version(t):
            return None
        return entry[2]()

    def put(self, t: torch.Tensor, handle: Handle) -> None:
        """Remember that ``t`` (at its current version) is stored as ``handle``."""
        entries = self._entries
        entries[id(t)] = (weakref.ref(t), tensor_version(t), weakref.ref(handle))
        if len(entries) >= self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        entries = self._entries
        for key in [k for k, e in entries.items() if e[0]() is None or e[2]() is None]:
            del entries[key]
        self._sweep_at = max(self._MIN_SWEEP, 2 * len(entries))

    def __len__(self) -> int:
        """Live entries (a tensor and its handle both alive)."""
        return sum(1 for e in self._entries.values() if e[0]() is not None and e[2]() is not None)
