"""Saved DTensors (tensor/sequence parallel): stored through their local tensors.

Under ``parallelize_module``, autograd saves DTensors (a parallel Linear's input, a
sequence-parallel norm's input) next to plain tensors (what runs between ``to_local`` and
``from_local``, e.g. attention). A saved DTensor is packed as its local tensor, through the
context's ordinary pack (kinds, dedup, recipes, the codec, exact byte accounting of this
rank's shard), and rebuilt into a DTensor with the same mesh, placements, global shape and
stride at unpack. Plain tensors never come here.

Why the local tensor and not the DTensor: views of a DTensor cannot be rebuilt with
``as_strided`` (DTensor refuses it), a DTensor's ``nbytes`` counts the global tensor, and the
local tensor of ``from_local(x)`` is a view of ``x``, so a recipe recorded for ``x`` (the
SwiGLU product before the row-parallel down projection) is found through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

from .._compat import dtensor_local, view_base
from .classify import parameter_source
from .store import Handle, HeldKept, Kept, _Built

_CODEC_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


class DTensorOf(_Built):
    """A saved DTensor: the handle of its local tensor, rebuilt into the DTensor.

    The in-place check is on the DTensor itself: an in-place op on a DTensor bumps its
    version, not its local tensor's (that one is modified below autograd)."""

    __slots__ = ("local", "layout", "view")

    def __init__(self, local: Handle, t: DTensor, view_of: torch.Tensor | None = None) -> None:
        super().__init__(t)
        self.local = local
        self.layout = (t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))
        self.view = None
        if view_of is not None:  # t's local tensor is a view of ``view_of``'s storage
            tl = dtensor_local(t)
            self.view = (tl.size(), tl.stride(), tl.storage_offset() - view_of.storage_offset())

    def _build(self) -> torch.Tensor:
        local = self.local.get()
        if self.view is not None:
            size, stride, rel = self.view
            local = local.as_strided(size, stride, local.storage_offset() + rel)
        mesh, placements, shape, stride = self.layout
        # Imported here: only reached for DTensors, whose module is then loaded already
        # (agoq.quant.codec.is_dtensor); at the top it would load torch.distributed.tensor
        # with every ``import agoq``.
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )


class _KeptView(Kept):
    """A view of a kept DTensor; the bytes are counted by (and live with) ``owner``."""

    __slots__ = ("owner",)

    def __init__(self, t: torch.Tensor, owner: Handle) -> None:
        super().__init__(t)
        self.owner = owner


def pack_dtensor(ctx: Any, t: DTensor) -> Handle:
    """The handle an :class:`~agoq.activations.context.ActivationContext` stores a saved
    DTensor ``t`` as (parameters and non-float DTensors are kept as they are)."""
    tracker = ctx._tracker
    if tracker.is_static(t) or t.dtype not in _CODEC_DTYPES:
        return Kept(t)
    base = view_base(t)
    key = base if base is not None and base.numel() == t.numel() else t
    if parameter_source(key)[0] is not None or (key.grad_fn is None and not key.requires_grad):
        # A cast of a parameter DTensor (autocast's weight copy), or a DTensor with no
        # autograd history (possibly a cast of a frozen one, which only a comparison with
        # the parameters could tell): never quantized. Kept, not rebuilt: the rebuild's
        # as_strided does not exist for DTensors. Counted once per tensor, like a store.
        fqn, kind = tracker.where()
        owner = ctx._table.get(key)
        if owner is None:
            nbytes = dtensor_local(key).nbytes
            ctx.report.record(fqn, kind, "kept", dtensor_local(key).numel(), nbytes, nbytes)
            ctx.report.hold(nbytes)
            owner = HeldKept(key, ctx.report.release, nbytes)
            ctx._table.put(key, owner)
        else:
            ctx.report.record(fqn, kind, "dedup", 0, 0, 0)
        return owner if key is t else _KeptView(t, owner)
    local = dtensor_local(key)
    if key is not t:
        t_local = dtensor_local(t)
        # A DTensor view is a view of the base's local tensor, unless the view needed a
        # redistribution (then its local tensor is new and is stored by itself).
        if t_local.untyped_storage().data_ptr() == local.untyped_storage().data_ptr():
            return DTensorOf(ctx._pack(local), t, view_of=local)
        local = t_local
    return DTensorOf(ctx._pack(local), t)
