"""Every private-torch touchpoint of the activation context, in one place (torch 2.13).

* ``saved_tensor_hook_context()``: AOTAutograd's per-node information while it inlines a
  GraphModule saved-tensor hook pair into a compiled graph (None in eager).
* ``top_saved_tensors_hooks()``: the innermost saved-tensor hook pair of this thread.
* ``no_static_hooks_filtering()``: make the inlined hooks see a compiled region's
  non-static inputs too (never its parameters or buffers).
* ``dtensor_local()``: a DTensor's own local tensor (the same object at every call; the
  public ``to_local()`` returns a new view each time, and the context keys its tables by
  tensor identity).
* ``has_own_hooks(module)``: whether a module has forward (pre-)hooks of its own.
* :class:`GlobalModuleHooks`: a global forward pre-hook and post-hook (always called)
  that can be installed and removed again and again *under the same keys*. Dynamo guards
  on the keys of torch's global hook dicts when it inlines a module call inside a compiled
  region, so hooks registered anew (new keys) at every context entry would recompile
  every compiled block at every step; with stable keys a region has two entries at most
  (hooks present / absent).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.nn.modules import module as _nn_module

try:  # private in torch 2.13 ("may change without backward compatibility")
    from torch._functorch._aot_autograd.graph_compile import (
        _get_saved_tensor_hook_context as saved_tensor_hook_context,
    )
except ImportError:  # pragma: no cover - other torch versions: no per-node information

    def saved_tensor_hook_context() -> dict[str, Any] | None:
        """No per-node information on this torch version."""
        return None


def dtensor_local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor a DTensor wraps (``DTensor._local_tensor``; checked on torch 2.13)."""
    try:
        return t._local_tensor
    except AttributeError:  # pragma: no cover - a torch whose DTensor stores it elsewhere
        raise RuntimeError(
            f"agoq: this torch {torch.__version__} DTensor has no _local_tensor; agoq's "
            "activation context cannot store DTensor activations on it (tested: torch 2.13)"
        ) from None


def top_saved_tensors_hooks() -> tuple[Any, Any] | None:
    """The innermost (pack, unpack) saved-tensor hook pair of this thread, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def no_static_hooks_filtering() -> AbstractContextManager:
    """A context in which compiled regions apply saved-tensor hooks to every saved value
    except the region's static inputs (parameters, buffers)."""
    return torch._functorch.config.patch(saved_tensors_hooks_filtering_mode="no_static")


def has_own_hooks(module: torch.nn.Module) -> bool:
    """True when ``module`` has forward pre-hooks or forward hooks of its own (e.g. tensor
    parallel's input/output redistribution): calling ``module.forward`` again would skip
    them, so such a module is never replayed."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


class GlobalModuleHooks:
    """A global module forward pre-hook and forward hook (``always_call``), installed and
    removed repeatedly under the keys of their first registration."""

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
        if self._keys is None:
            pre = _nn_module.register_module_forward_pre_hook(self._pre)
            post = _nn_module.register_module_forward_hook(self._post, always_call=True)
            self._keys = (pre.id, post.id)
        else:
            # What register_module_forward_(pre_)hook do, under the first keys.
            k_pre, k_post = self._keys
            _nn_module._global_forward_pre_hooks[k_pre] = self._pre
            _nn_module._global_forward_hooks[k_post] = self._post
            _nn_module._global_forward_hooks_always_called[k_post] = True
        self.installed = True

    def remove(self) -> None:
        """Unregister both hooks (no-op when not installed)."""
        if not self.installed or self._keys is None:
            return
        k_pre, k_post = self._keys
        _nn_module._global_forward_pre_hooks.pop(k_pre, None)
        _nn_module._global_forward_hooks.pop(k_post, None)
        _nn_module._global_forward_hooks_always_called.pop(k_post, None)
        self.installed = False
