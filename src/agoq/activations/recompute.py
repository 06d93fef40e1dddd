"""Case 1 of the paper: store a cheap op's input, rebuild its output in backward.

Inside :func:`agoq.quantize_activations`, a TorchFunctionMode watches a few cheap ops and
records, for each output, how to rebuild it (a *recipe*): RMSNorm outputs (the Q/K/V and
gate/up GEMM inputs) and activation-function outputs and their products (the SwiGLU
product, the down-projection input). When such an output is saved for backward and its
inputs are already stored, the pack hook stores the recipe (0 bytes) instead of the tensor.

``F.rms_norm`` is routed to :class:`RMSNormFunction`, which saves only its input and
weight (the CPU composite of rms_norm also saves a normalised copy of the input).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._compat import tensor_version


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm whose backward needs only x and the weight (rstd is recomputed)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):  # noqa: D102
        y = F.rms_norm(x, normalized_shape, weight, eps)
        ctx.dims = tuple(range(-len(normalized_shape), 0))
        ctx.eps = eps
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight = ctx.saved_tensors
        dims = ctx.dims
        eps = ctx.eps if ctx.eps is not None else torch.finfo(x.dtype).eps
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
        xhat = xf * rstd
        dyf = dy.float()
        dxhat = dyf * weight.float() if weight is not None else dyf
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(dims, keepdim=True))
        dw = None
        if weight is not None and ctx.needs_input_grad[2]:
            lead = tuple(range(dy.dim() - len(dims)))
            dw = (dyf * xhat).sum(lead).to(weight.dtype) if lead else (dyf * xhat).to(weight.dtype)
        return dx.to(x.dtype), None, dw, None


def _rms_norm(x, normalized_shape, weight, eps):
    return F.rms_norm(x, normalized_shape, weight, eps)


def _mul(a, b):
    return a * b


_ACTIVATIONS: dict[Callable, Callable] = {
    F.silu: lambda x: F.silu(x),
    F.gelu: lambda x, approximate="none": F.gelu(x, approximate=approximate),
    F.relu: lambda x: F.relu(x),
}
_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_CASTS = {
    torch.Tensor.to,
    torch.Tensor.float,
    torch.Tensor.bfloat16,
    torch.Tensor.half,
    torch.Tensor.type_as,
}
# Geometry changes: the copy a reshape of a transposed tensor makes keeps its tag (the
# attention output, head-major, copied into the out-projection's input).
_RESHAPES = {
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.contiguous,
    torch.Tensor.flatten,
    torch.flatten,
}
_SDPA = F.scaled_dot_product_attention
_WATCHED = frozenset({F.rms_norm, *_ACTIVATIONS, *_MULS, *_SOFTMAX, *_CASTS, *_RESHAPES, _SDPA})


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (the recipe of a cast)."""
    return x.to(dtype)


class Tagger:
    """What the recipe mode tells the context about the ops it sees (see ActivationContext):
    ``tag(t, kind, strong)`` names the kind of a tensor wherever it is saved (strong: over
    the saving module's rule), ``tag_of(t)`` reads it back, ``op(kind, strong)`` is a
    context manager naming the kind of what an op saves while it runs (an attention op's
    internals, a softmax's output); ``stored(t)`` says whether ``t`` is stored already."""

    def tag(self, t: torch.Tensor, kind: str, strong: bool) -> None:  # noqa: D102
        raise NotImplementedError

    def tag_of(self, t: torch.Tensor) -> tuple[str, bool] | None:  # noqa: D102
        raise NotImplementedError

    def op(self, kind: str, strong: bool) -> Any:  # noqa: D102
        raise NotImplementedError

    def stored(self, t: torch.Tensor) -> bool:  # noqa: D102
        raise NotImplementedError


class Recipes:
    """Weakly keyed registry: output tensor -> (function, args) that rebuilds it.

    A recipe holds only while the output and every tensor input are at the version they
    had when the op ran: an in-place change of either makes the rebuild wrong."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, Callable, tuple, tuple, Any]] = {}
        # id(out.grad_fn) -> id(out): finds the tensor behind an autograd node (autocast's
        # cast of a norm output saves a copy whose grad_fn points at the output's node).
        # The entry holds the node, so its Python object (and id) stays the same.
        self._nodes: dict[int, int] = {}

    def add(self, out: torch.Tensor, fn: Callable, args: tuple) -> None:
        """Record that ``out == fn(*args)``."""
        key = id(out)
        node = out.grad_fn
        entries, nodes = self._entries, self._nodes

        def drop(wr: weakref.ref, key: int = key) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is wr:
                del entries[key]
                if entry[5] is not None and nodes.get(id(entry[5])) == key:
                    del nodes[id(entry[5])]

        versions = tuple(tensor_version(a) if isinstance(a, torch.Tensor) else None for a in args)
        entries[key] = (weakref.ref(out, drop), tensor_version(out), fn, args, versions, node)
        if node is not None:
            nodes[id(node)] = key

    def source_of(self, node: Any) -> torch.Tensor | None:
        """The live tensor with a recipe whose grad_fn is ``node``, if any."""
        key = self._nodes.get(id(node))
        entry = self._entries.get(key) if key is not None else None
        if entry is None or entry[5] is not node:
            return None
        return entry[0]()

    def get(self, t: torch.Tensor) -> tuple[Callable, tuple] | None:
        """The recipe of ``t`` if one was recorded for this very tensor and nothing it
        depends on changed since."""
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != tensor_version(t):
            return None
        _, _, fn, args, versions, _ = entry
        for a, v in zip(args, versions, strict=True):
            if v is not None and tensor_version(a) != v:
                return None
        return fn, args

    def __len__(self) -> int:
        return len(self._entries)


class RecipeMode(TorchFunctionMode):
    """Records recipes for cheap ops while the activation context is active."""

    def __init__(
        self, recipes: Recipes, enabled: Callable[[], bool], tagger: Tagger | None = None
    ) -> None:
        super().__init__()
        self.recipes = recipes
        self.enabled = enabled
        self.tagger = tagger

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        # Every torch call (and tensor attribute read) comes through here while the mode
        # is on: the few watched functions are told apart by one set lookup first.
        if func not in _WATCHED:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not self.enabled():
            return func(*args, **kwargs)
        if func is F.rms_norm:
            return self._rms_norm(*args, **kwargs)
        if func in _ACTIVATIONS and not kwargs.get("inplace", False):
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                extra = {k: v for k, v in kwargs.items() if k != "inplace"}
                self.recipes.add(
                    out, lambda x, _f=_ACTIVATIONS[func], _k=extra: _f(x, **_k), args[:1]
                )
            return out
        if func in _MULS and len(args) == 2 and not kwargs:
            a, b = args
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                return func(*args)
            ra, rb = self.recipes.get(a) is not None, self.recipes.get(b) is not None
            if self.tagger is not None and ra != rb:
                # act(gate) * up: the other factor is the MLP activation's input, by what
                # it is (named before the mul saves it), the product the down projection's.
                self.tagger.tag(b if ra else a, "swiglu_input", False)
            out = func(*args)
            if (ra or rb) and isinstance(out, torch.Tensor) and out.requires_grad:
                self.recipes.add(out, _mul, (a, b))
                if self.tagger is not None and ra != rb:
                    self.tagger.tag(out, "mlp_down_input", False)
            return out
        tagger = self.tagger
        if func in _CASTS:
            out = func(*args, **kwargs)
            x = args[0] if args else None
            if (
                isinstance(out, torch.Tensor)
                and isinstance(x, torch.Tensor)
                and out is not x
                and out.requires_grad
                and out.device == x.device
                and out.shape == x.shape
                and out.dtype != x.dtype
                # Only a cast of a tensor already stored or rebuilt: a recipe holds its
                # inputs, and a cast of anything else (rotary's q.float()) would keep its
                # source alive for as long as the cast lives.
                and (self.recipes.get(x) is not None or (tagger is not None and tagger.stored(x)))
            ):
                self.recipes.add(out, cast, (x, out.dtype))
                tag = tagger.tag_of(x) if tagger is not None else None
                if tag is not None:
                    tagger.tag(out, *tag)
            return out
        x = args[0] if args else None
        if func in _RESHAPES:
            out = func(*args, **kwargs)
            if tagger is not None and isinstance(x, torch.Tensor) and out is not x:
                tag = tagger.tag_of(x)
                if tag is not None and isinstance(out, torch.Tensor):
                    tagger.tag(out, *tag)
            return out
        if func in _SOFTMAX and tagger is not None and isinstance(x, torch.Tensor) and x.dim() >= 3:
            # Attention probabilities (batch, heads, q, k); a router's softmax is 2-D. The
            # softmax saves its output while it runs: its saves are named while it runs.
            with tagger.op("attn_probs", True):
                out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                tagger.tag(out, "attn_probs", True)
            return out
        if func is _SDPA and tagger is not None:
            with tagger.op("attn_internals", False):
                out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                tagger.tag(out, "attn_out_input", False)
            return out
        return func(*args, **kwargs)

    def _rms_norm(self, x: Any, normalized_shape: Any, weight: Any = None, eps: Any = None):
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        needs_grad = x.requires_grad or (weight is not None and weight.requires_grad)
        if not needs_grad:
            return F.rms_norm(x, shape, weight, eps)
        out = RMSNormFunction.apply(x, shape, weight, eps)
        self.recipes.add(out, _rms_norm, (x, shape, weight, eps))
        return out
