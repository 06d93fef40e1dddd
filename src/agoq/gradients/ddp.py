"""``ddp_model.register_comm_hook(state, agoq.int8_allreduce)``: the int8 all-reduce as a DDP
communication hook, for eager DDP, compiled models (DDPOptimizer) and compiled DDP
(``optimize_ddp="python_reducer"``, where the hook gets ``(grad, param)`` per parameter).

No ``from __future__ import annotations`` here: DDP checks the hook's annotations at
registration and rejects anything but ``dist.GradBucket`` / ``Future[Tensor]`` objects."""

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ..quant import QuantSpec
from .allreduce import DEFAULT_SPEC, int8_all_reduce, int8_all_reduce_functional


class Int8AllReduceState:
    """Options and error-feedback buffers of :func:`int8_allreduce`.

    ``block``, ``scale_dtype`` and ``rounding`` set the int8 format (default: block 128,
    bf16 scales); ``min_numel``: buckets with fewer
    elements use a plain full-precision all-reduce. ``error_feedback`` keeps, per parameter,
    the error of the last first-stage quantization and adds it before the next one; it is
    kept per parameter (not per bucket), so it survives DDP's bucket rebuild after the first
    iteration, and it travels with ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        block: int = DEFAULT_SPEC.block,
        scale_dtype: torch.dtype = DEFAULT_SPEC.scale_dtype,
        rounding: str = "nearest",
        error_feedback: bool = False,
        min_numel: int = 0,
        seed: int = 0,
    ) -> None:
        self.process_group = process_group
        self.spec = QuantSpec(
            bits=8, format="int", block=block, rounding=rounding, scale_dtype=scale_dtype
        )
        self.error_feedback = error_feedback
        if not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
        self.min_numel = min_numel
        self.seed = seed
        self.residuals: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}
        self._generator: torch.Generator | None = None
        self.calls = 0

    def _key(self, param: torch.Tensor) -> str:
        # Parameters are named by first appearance; DDP's bucket order is deterministic, so
        # the names are the same in every run of the same model and survive the rebuild.
        key = self._keys.get(id(param))
        if key is None:
            key = self._keys[id(param)] = f"p{len(self._keys)}"
        return key

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The stochastic-rounding generator (per rank), or None for nearest rounding."""
        if self.spec.rounding != "stochastic":
            return None
        if self._generator is None:
            rank = dist.get_rank(self.process_group)
            self._generator = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        """Options and error-feedback residuals (CPU copies)."""
        return {
            "spec": dataclasses.asdict(self.spec) | {"scale_dtype": str(self.spec.scale_dtype)},
            "error_feedback": self.error_feedback,
            "min_numel": self.min_numel,
            "seed": self.seed,
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore residuals saved by :meth:`state_dict` (options must match)."""
        unknown = set(state) - {"spec", "error_feedback", "min_numel", "seed", "residuals"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in Int8AllReduceState state")
        if state["spec"]["block"] != self.spec.block:
            raise ValueError(
                f"state was saved with block {state['spec']['block']}, this state uses {self.spec.block}"
            )
        self.error_feedback = state["error_feedback"]
        self.min_numel = state["min_numel"]
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["process_group"] = None  # process groups do not pickle; reattach after loading
        d["_generator"] = None
        return d

    def _bucket_residual(self, bucket: "dist.GradBucket") -> tuple[torch.Tensor, list]:
        """A flat fp32 residual laid out like the bucket buffer, and where each param sits."""
        buf = bucket.buffer()
        flat = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
        slots = []
        base = buf.data_ptr()
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
            off = (g.data_ptr() - base) // buf.element_size()
            key = self._key(p)
            r = self.residuals.get(key)
            if r is not None and r.numel() == g.numel():
                flat[off : off + g.numel()] = r.to(flat.device).reshape(-1)
            slots.append((key, off, g.numel()))
        return flat, slots

    def _store_residual(self, flat: torch.Tensor, slots: list) -> None:
        for key, off, n in slots:
            self.residuals[key] = flat[off : off + n].clone()


def _resolve(state: Any) -> tuple[dist.ProcessGroup | None, Int8AllReduceState]:
    if isinstance(state, Int8AllReduceState):
        return state.process_group, state
    if state is None or isinstance(state, dist.ProcessGroup):
        return state, Int8AllReduceState(state)
    raise TypeError(
        "int8_allreduce state must be None, a ProcessGroup or an agoq Int8AllReduceState, "
        f"got {type(state).__name__}"
    )


def int8_allreduce(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket over the group with the int8 all-reduce.

    ``state``: None (default group), a ProcessGroup, or an :class:`Int8AllReduceState`.
    Collectives run and complete in the calling thread; the returned Future is already set.
    In compiled DDP (``bucket`` is then a ``(grad, param)`` tuple) or while compiling,
    functional collectives are used and a tensor is returned, as DDP expects there; error
    feedback is not applied on that path.
    """
    group, st = _resolve(state)
    if isinstance(bucket, tuple) or torch.compiler.is_compiling():
        grad = bucket[0] if isinstance(bucket, tuple) else bucket.buffer()
        pg = group if group is not None else dist.group.WORLD
        out = int8_all_reduce_functional(grad, pg, spec=st.spec)
        return grad.copy_(out) if isinstance(bucket, tuple) else out
    buf = bucket.buffer()
    st.calls += 1
    if buf.numel() < st.min_numel:
        buf.div_(dist.get_world_size(group))
        dist.all_reduce(buf, group=group)
    else:
        residual, slots = st._bucket_residual(bucket) if st.error_feedback else (None, None)
        base = buf.data_ptr()
        segments = [
            ((g.data_ptr() - base) // buf.element_size(), g.numel()) for g in bucket.gradients()
        ]
        int8_all_reduce(
            buf,
            group,
            spec=st.spec,
            generator=st.generator(buf.device),
            residual=residual,
            segments=segments,
        )
        if residual is not None:
            st._store_residual(residual, slots)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


__all__ = ["DEFAULT_SPEC", "Int8AllReduceState", "int8_allreduce"]
