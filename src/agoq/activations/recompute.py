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
_WATCHED = frozenset({F.rms_norm, *_ACTIVATIONS, *_MULS})


class Recipes:
    """Weakly keyed registry: output tensor -> (function, args) that rebuilds it.

    A recipe holds only while the output and every tensor input are at the version they
    had when the op ran: an in-place change of either makes the rebuild wrong."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, Callable, tuple, tuple]] = {}

    def add(self, out: torch.Tensor, fn: Callable, args: tuple) -> None:
        """Record that ``out == fn(*args)``."""
        key = id(out)

        def drop(wr: weakref.ref, key: int = key) -> None:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is wr:
                del self._entries[key]

        versions = tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)
        self._entries[key] = (weakref.ref(out, drop), out._version, fn, args, versions)

    def get(self, t: torch.Tensor) -> tuple[Callable, tuple] | None:
        """The recipe of ``t`` if one was recorded for this very tensor and nothing it
        depends on changed since."""
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != t._version:
            return None
        _, _, fn, args, versions = entry
        for a, v in zip(args, versions, strict=True):
            if v is not None and a._version != v:
                return None
        return fn, args

    def __len__(self) -> int:
        return len(self._entries)


class RecipeMode(TorchFunctionMode):
    """Records recipes for cheap ops while the activation context is active."""

    def __init__(self, recipes: Recipes, enabled: Callable[[], bool]) -> None:
        super().__init__()
        self.recipes = recipes
        self.enabled = enabled

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
            out = func(*args)
            a, b = args
            if (
                isinstance(out, torch.Tensor)
                and out.requires_grad
                and isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and (self.recipes.get(a) is not None or self.recipes.get(b) is not None)
            ):
                self.recipes.add(out, _mul, (a, b))
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
