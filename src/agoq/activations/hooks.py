"""The hooks: the saved-tensor pair (eager and compiled) and the module hooks.

The pair is built as ``torch.fx.GraphModule``s so torch.compile inlines it. In eager mode
autograd calls the pair like any callable; their ``__call__`` goes straight to the innermost
active :class:`~agoq.activations.context.ActivationContext` (no GraphModule wrappers: this
runs once per saved tensor). When AOTAutograd compiles a region while the context is
active, it *inlines* GraphModule hooks into the compiled forward and backward (torch >=
2.13): it calls the leaves at trace time, once per saved graph node, with
``_get_saved_tensor_hook_context()`` describing the node. The leaves then return only tensors
and constants built with the codec op (``torch.ops.agoq.quantize_blockwise``, whose fake
kernel traces and whose fused kernel runs in the compiled graph), and no Python runs per step.

Under compile the saving module is known from dynamo's ``nn_module_stack`` of the node that
produced the saved value, and attention is recognised by the node's source or by its use in
an attention backward; the plan's actions apply per kind (``"recompute"`` kinds use the
fallback spec: inductor's partitioner does its own recomputation of cheap ops).

Hook pairs are memoised per plan: dynamo guards on the pair's identity, and a new pair
would recompile every region.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import torch

from .._compat import GlobalModuleHooks
from .._compat import saved_tensor_hook_context as _get_saved_tensor_hook_context
from ..quant import Packed, QuantSpec, dequantize, quantize
from .plan import ActivationPlan
from .store import Handle

# Active ActivationContexts of the calling thread, innermost last. Per thread: a forward
# running in another thread (an eval model, a data worker) must not reach this thread's
# context, and saved-tensor hooks are thread-local in torch too.
_LOCAL = threading.local()
_PLANS: dict[str, ActivationPlan] = {}
_PAIRS: dict[str, tuple[torch.fx.GraphModule, torch.fx.GraphModule]] = {}

_aten = torch.ops.aten
_VIEWS = {
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.t.default,
    _aten.transpose.int,
    _aten.permute.default,
    _aten.expand.default,
    _aten.detach.default,
    _aten.alias.default,
    _aten.reshape.default,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.clone.default,
}


def active() -> list[Any]:
    """The calling thread's active contexts, innermost last."""
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def push_active(ctx: Any) -> None:
    """Make ``ctx`` the context this thread's eager packs and module hooks go to."""
    _acquire_module_hooks()
    active().append(ctx)


def pop_active(ctx: Any) -> None:
    """Remove ``ctx`` from this thread's active contexts (no-op if it is not there)."""
    stack = active()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is ctx:
            del stack[i]
            _release_module_hooks()
            return


# The global module hooks are installed only while some context is active, in any thread
# (a count of active entries): with them, every module call in the process takes
# nn.Module's slow path, and torch warns at every call of a torch.compile'd module. They
# come back under the same keys (see GlobalModuleHooks), so a compiled region is not
# recompiled at every entry.
_HOOKS_LOCK = threading.Lock()
_HOOK_USERS = 0


def _acquire_module_hooks() -> None:
    global _HOOK_USERS
    with _HOOKS_LOCK:
        if _HOOK_USERS == 0:
            _MODULE_HOOKS.install()
        _HOOK_USERS += 1


def _release_module_hooks() -> None:
    global _HOOK_USERS
    with _HOOKS_LOCK:
        _HOOK_USERS -= 1
        if _HOOK_USERS == 0:
            _MODULE_HOOKS.remove()


def _global_pre_hook(module: torch.nn.Module, args: Any) -> None:
    # is_compiling() first, so dynamo folds the hook away inside compiled regions (no
    # guard on the active contexts, no recompilation when a new context is entered).
    if torch.compiler.is_compiling():
        return
    stack = getattr(_LOCAL, "stack", None)
    if stack:
        stack[-1]._module_pre(module, args)


def _global_post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = getattr(_LOCAL, "stack", None)
    if stack:
        stack[-1]._module_post(module, output)


_MODULE_HOOKS = GlobalModuleHooks(_global_pre_hook, _global_post_hook)


def _is_attention_op(target: Any) -> bool:
    name = str(target)
    return "scaled_dot_product" in name or "flash_attention" in name or "flex_attention" in name


def _feeds_attention_backward(bw_graph: torch.fx.Graph | None, name: str) -> bool:
    """True if backward input ``name`` reaches an attention backward op through views."""
    if bw_graph is None:
        return False
    todo = [p for p in bw_graph.find_nodes(op="placeholder") if p.name == name]
    seen: set[torch.fx.Node] = set()
    while todo:
        for user in todo.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if _is_attention_op(user.target) and "backward" in str(user.target):
                return True
            if user.target in _VIEWS:
                todo.append(user)
    return False


def _module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(FQN-like path, class name) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return module_path(path), getattr(cls, "__name__", str(cls))


_CLOSURE = re.compile(r"(?:^|\.)(?:\w+\.)?__closure__\.\d+\.cell_contents(?=\.|$)")
_SELF = re.compile(r"(?:^|\.)__self__(?=\.|$)")


def module_path(source: str) -> str:
    """The module FQN (relative to the compiled module) in a dynamo source path.

    Dynamo spells paths like ``L['self'].layers['0'].attention.wq``; when a module's
    ``forward`` was replaced by a closure over the bound original (torchtitan 0.3's
    ``Module.parallelize``, other wrappers), through it: ``L['fn'].__self__.attention.
    forward.__closure__[0].cell_contents.__self__.wq`` is ``attention.wq``.
    """
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", source)
    path = re.sub(r"^L\.self\.?|^L\.[^.]+\.?", "", path)
    path = _CLOSURE.sub("", path)
    return _SELF.sub("", path).strip(".")


_CASTS = {torch.ops.prims.convert_element_type.default, _aten._to_copy.default}


def copy_of_input(node: torch.fx.Node | None, static_shapes: set[tuple[int, ...]] | None) -> bool:
    """True when a saved graph node is only a cast and/or view of a region input shaped
    like a parameter or buffer (autocast's weight copy, the transposed weight of a mm):
    a copy of a parameter is never quantized. AOTAutograd does not tell the hook which
    inputs are parameters, so the shape decides; a false match only keeps a tensor. With
    no shapes known (the model was never seen eagerly), any region input counts."""
    steps = 0
    while node is not None and steps < 16:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if steps == 0 or val is None:
                return False
            return static_shapes is None or tuple(val.shape) in static_shapes
        if node.op != "call_function" or (node.target not in _VIEWS and node.target not in _CASTS):
            return False
        node = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        steps += 1
    return False


def compiled_spec(
    x: torch.Tensor,
    node: torch.fx.Node | None,
    bw_graph: Any,
    plan: ActivationPlan,
    static_shapes: set[tuple[int, ...]] | None = None,
) -> QuantSpec | None:
    """The spec a saved graph node is stored in under compile, or None to keep it."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if x.numel() < max(plan.min_numel, 1):
        return None
    if copy_of_input(node, static_shapes or None):
        return None
    if plan.compiled != "plan":
        return plan.compiled if isinstance(plan.compiled, QuantSpec) else None
    kind = "other"
    if node is not None:
        sources = [s[0] for s in node.meta.get("source_fn_stack", [])]
        sources += [s[0] for s in node.meta.get("fwd_source_fn_stack", [])]
        if any(_is_attention_op(s) for s in sources) or _feeds_attention_backward(
            bw_graph, node.name
        ):
            kind = "attn_internals"
        else:
            # A region input (e.g. a block's input, saved by its first norm) has no module:
            # use the module of its first consumer.
            src = node
            if node.op == "placeholder":
                src = next((u for u in node.users if u.meta.get("nn_module_stack")), node)
            path, cls = _module_of(src)
            # Rules match on the class name: an empty instance of a same-named class will do.
            # A value made in a decoder layer itself (not in a submodule) is its residual
            # stream: the layer's producer rule names it.
            fake = type(cls or "Module", (), {})()
            kind = plan.kind_of(path, fake) or plan.producer_kind(path, fake) or "other"
    action = plan.action(kind)
    if action == "recompute":
        action = plan.fallback
    return action if isinstance(action, QuantSpec) else None


@torch.fx.wrap
def agoq_pack(x: torch.Tensor, key: str) -> Any:
    """Pack leaf: eager -> the active context; compile -> traceable codec ops."""
    aot = _get_saved_tensor_hook_context()
    if aot is None:
        stack = getattr(_LOCAL, "stack", None)
        if not stack:  # e.g. an autograd worker thread in a create_graph backward: keep
            return x
        return stack[-1]._pack(x)
    stack = getattr(_LOCAL, "stack", None)
    shapes = stack[-1]._tracker.static_shapes() if stack else None
    spec = compiled_spec(x, aot.get("_node"), aot.get("_bw_graph"), _PLANS[key], shapes)
    if spec is None:
        return x
    p = quantize(x, spec)
    # Only tensors and plain constants may leave a compiled hook (a dataclass breaks AOT).
    fields = (spec.bits, spec.format, spec.block, spec.rounding, spec.scale_dtype)
    return (p.payload, p.scales, fields, tuple(p.shape), tuple(p.stride), p.dtype, p.memory_order)


@torch.fx.wrap
def agoq_unpack(obj: Any) -> torch.Tensor:
    """Unpack leaf: rebuild what :func:`agoq_pack` stored (original shape and strides)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, tuple):
        payload, scales, fields, shape, stride, dtype, memory_order = obj
        p = Packed(
            payload,
            scales,
            QuantSpec(*fields),
            torch.Size(shape),
            tuple(stride),
            dtype,
            memory_order,
        )
        return dequantize(p)
    return obj.get()


class _HookModule(torch.fx.GraphModule):
    """A GraphModule whose call skips nn.Module hooks: autograd calls the pack hook once per
    saved tensor, and module hooks (agoq's own, MemTracker's) must not see those calls."""

    def __call__(self, *args: Any) -> Any:
        return self.forward(*args)


def _pack_call(self: torch.fx.GraphModule, x: torch.Tensor) -> Any:
    # Eager: straight to the active context, without GraphModule's call wrappers (once
    # per saved tensor). While AOTAutograd inlines the hook: the traced graph.
    if _get_saved_tensor_hook_context() is None:
        stack = getattr(_LOCAL, "stack", None)
        if not stack:  # e.g. an autograd worker thread in a create_graph backward: keep
            return x
        return stack[-1]._pack(x)
    return self.forward(x)


def _unpack_call(self: torch.fx.GraphModule, obj: Any) -> Any:
    if isinstance(obj, Handle):
        return obj.get()
    return self.forward(obj)


def hook_pair(plan: ActivationPlan) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The (pack, unpack) GraphModules for ``plan``, built once per distinct plan."""
    key = repr(plan)
    pair = _PAIRS.get(key)
    if pair is None:
        _PLANS[key] = plan
        pack = torch.fx.symbolic_trace(lambda x: agoq_pack(x, key))
        unpack = torch.fx.symbolic_trace(lambda obj: agoq_unpack(obj))
        pair = (
            _HookModule(pack, pack.graph, "agoq_pack_hook"),
            _HookModule(unpack, unpack.graph, "agoq_unpack_hook"),
        )
        # Each GraphModule has a class of its own, whose __call__ recompile() set to
        # GraphModule's wrapper chain: replace it with the direct calls above.
        type(pair[0]).__call__ = _pack_call
        type(pair[1]).__call__ = _unpack_call
        _PAIRS[key] = pair
    return pair
