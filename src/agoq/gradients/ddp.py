"""``ddp_model.register_comm_hook(state, agoq.int8_allreduce)``: the int8 all-reduce as a DDP
communication hook, for eager DDP, compiled models (DDPOptimizer) and compiled DDP
(``optimize_ddp="python_reducer"``, where the hook gets ``(grad, param)`` per parameter).

At its first bucket the hook exchanges a fingerprint of its settings with the other ranks
(one all_gather of a few integers) and raises on every rank, naming the fields, when they
differ: ranks with different block, scale dtype, rounding, ``min_numel``, error feedback,
numerics guard or step counter would otherwise reduce different layouts (silently wrong
gradients or a hang).

No ``from __future__ import annotations`` here: DDP checks the hook's annotations at
registration and rejects anything but ``dist.GradBucket`` / ``Future[Tensor]`` objects."""

import struct
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._validate import expect_bool, expect_int, expect_str
from ..quant import QuantSpec
from ._common import check_state, global_rank, unwrap
from .allreduce import (
    DEFAULT_SPEC,
    check_grad_dtype,
    int8_all_reduce,
    int8_all_reduce_functional,
    relative_rms,
    verify_same_on_all_ranks,
)

# Bump when the hook's collective sequence or math changes: ranks running different agoq
# versions then refuse to reduce together.
PROTOCOL = 2
_STATE_VERSION = 2
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
_ROUNDINGS = ("nearest", "stochastic")
_ACTION_CODES = {"fallback": 1, "warn": 2, "raise": 3}
_OPTIONS = ("block", "scale_dtype", "rounding", "error_feedback", "min_numel", "seed")


def _is_guard(guard: Any) -> bool:
    return all(callable(getattr(guard, a, None)) for a in ("due", "observe", "is_fallback"))


class Int8AllReduceState:
    """Options, error-feedback residuals and numerics checks of :func:`int8_allreduce`.

    ``block``, ``scale_dtype`` and ``rounding`` set the int8 format (default: block 128,
    bf16 scales); ``min_numel``: buckets with fewer elements use a plain full-precision
    all-reduce. ``error_feedback`` keeps, per parameter, the error of the last first-stage
    quantization and adds it before the next one. It is keyed by parameter FQN, so it
    survives DDP's bucket rebuild and a resume into a rebuilt model; it needs the
    parameter names: pass ``model`` (the DDP module or the module it wraps) or call
    :meth:`bind`. A block that is not finite (an fp16 overflow) comes back NaN, so GradScaler
    skips the step, and its residual restarts at 0.

    ``guard`` (an :class:`agoq.NumericsGuard`) or ``numerics_check_every=N`` (a default
    guard checking every N steps): at every ``guard.every``-th step one bucket (round-robin)
    is also reduced in full precision and ``guard.observe("grad/bucket<i>", rel_err)`` gets
    the relative RMS error of the int8 result; a bucket the guard switched to fallback is
    reduced in full precision from then on. Steps are counted when bucket 0 arrives; step 0
    is never checked (DDP regroups its buckets after the first iteration, so bucket indices
    only mean the same parameters from step 1 on).
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
        model: torch.nn.Module | None = None,
        guard: Any = None,
        numerics_check_every: int | None = None,
    ) -> None:
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "Int8AllReduceState: process_group must be None or a ProcessGroup, got "
                f"{type(process_group).__name__}"
            )
        self.process_group = process_group
        expect_int(block, "Int8AllReduceState: block")
        expect_str(rounding, "Int8AllReduceState: rounding", choices=_ROUNDINGS)
        self.spec = QuantSpec(
            bits=8, format="int", block=block, rounding=rounding, scale_dtype=scale_dtype
        )
        self.error_feedback = expect_bool(error_feedback, "Int8AllReduceState: error_feedback")
        self.min_numel = expect_int(min_numel, "Int8AllReduceState: min_numel", low=0)
        self.seed = expect_int(seed, "Int8AllReduceState: seed")
        if numerics_check_every is not None:
            expect_int(numerics_check_every, "Int8AllReduceState: numerics_check_every", low=1)
            if guard is not None:
                raise ValueError(
                    "Int8AllReduceState: pass guard or numerics_check_every, not both "
                    "(numerics_check_every=N is NumericsGuard(every=N))"
                )
            from ..guard import NumericsGuard

            guard = NumericsGuard(every=numerics_check_every)
        if guard is not None and not _is_guard(guard):
            raise TypeError(
                f"Int8AllReduceState: guard must be an agoq NumericsGuard, got {type(guard).__name__}"
            )
        self.guard = guard
        self.residuals: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}
        self._params: dict[str, torch.Tensor] = {}
        self._generator: torch.Generator | None = None
        self._verified = False
        self.calls = 0
        self.steps = 0  # steps started (bucket 0 arrivals)
        self.buckets_seen = 0  # highest bucket index seen + 1 (the round-robin's period)
        if model is not None:
            self.bind(model)

    # ------------------------------------------------------------------ names

    def bind(self, model: torch.nn.Module) -> "Int8AllReduceState":
        """Learn the parameter names (FQNs) of ``model`` (DDP-wrapped, compiled or plain);
        with error feedback, allocate a zero residual per trainable parameter."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Int8AllReduceState: model must be a torch.nn.Module, got {type(model).__name__}"
            )
        names: dict[int, str] = {}
        params: dict[str, torch.Tensor] = {}
        for name, p in unwrap(model).named_parameters():
            if p.requires_grad:
                names[id(p)] = name
                params[name] = p
        self._names, self._params = names, params
        if self.error_feedback:
            old = self.residuals
            self.residuals = {
                n: old[n]
                if n in old and old[n].shape == p.shape
                else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for n, p in params.items()
            }
        return self

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The stochastic-rounding generator (per rank), or None for nearest rounding."""
        if self.spec.rounding != "stochastic":
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed + global_rank())
        return self._generator

    # ------------------------------------------------------------ fingerprint

    def _fingerprint(self, bucket: "dist.GradBucket") -> list[tuple[str, int]]:
        g = self.guard
        fallbacks = ""
        if g is not None:
            fallbacks = ",".join(sorted(n for n in getattr(g, "fallbacks", ()) if "grad/" in n))
        return [
            ("agoq hook protocol", PROTOCOL),
            ("block", self.spec.block),
            ("scale_dtype", _DTYPE_CODES.get(self.spec.scale_dtype, 0)),
            ("rounding", _ROUNDINGS.index(self.spec.rounding)),
            ("error_feedback", int(self.error_feedback)),
            ("min_numel", self.min_numel),
            ("parameter names bound (model=)", int(bool(self._names))),
            ("guard", int(g is not None)),
            ("guard.every", getattr(g, "every", 0)),
            (
                "guard.threshold",
                struct.unpack("<q", struct.pack("<d", getattr(g, "threshold", 0.0)))[0],
            ),
            ("guard.action", _ACTION_CODES.get(getattr(g, "action", None), 0)),
            ("guard fallbacks (grad/)", zlib.crc32(fallbacks.encode())),
            ("steps (a resumed state on some ranks only?)", self.steps),
            ("first bucket's numel (bucket_cap_mb?)", bucket.buffer().numel()),
            ("gradient dtype", _DTYPE_CODES.get(bucket.buffer().dtype, 0)),
        ]

    def _verify(self, bucket: "dist.GradBucket") -> None:
        """Exchange the fingerprint once; raise on every rank if any field differs."""
        verify_same_on_all_ranks(
            "int8_allreduce (Int8AllReduceState)",
            self._fingerprint(bucket),
            self.process_group,
            bucket.buffer().device,
        )
        self._verified = True

    # -------------------------------------------------------------- residuals

    def _bucket_residual(self, bucket: "dist.GradBucket") -> tuple[torch.Tensor, list]:
        """A flat fp32 residual laid out like the bucket buffer, and where each param sits."""
        if not self._names:
            raise ValueError(
                "Int8AllReduceState(error_feedback=True) needs the parameter names to key its "
                "residuals: pass model=ddp_model to Int8AllReduceState or call "
                "state.bind(ddp_model) before training"
            )
        buf = bucket.buffer()
        flat = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
        slots = []
        base = buf.data_ptr()
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
            key = self._names.get(id(p))
            if key is None:
                raise ValueError(
                    f"Int8AllReduceState: a parameter of shape {tuple(p.shape)} in DDP's bucket "
                    "is not in the model bound with model= / bind(); bind the DDP module "
                    "that this hook is registered on"
                )
            off = (g.data_ptr() - base) // buf.element_size()
            r = self.residuals[key]
            flat[off : off + g.numel()] = r.reshape(-1)
            slots.append((key, off, g.numel()))
        return flat, slots

    def _store_residual(self, flat: torch.Tensor, slots: list) -> None:
        for key, off, n in slots:
            r = self.residuals[key]
            r.copy_(flat[off : off + n].view(r.shape))

    # ------------------------------------------------------------ checkpoint

    def _options(self) -> dict[str, Any]:
        return {
            "block": self.spec.block,
            "scale_dtype": str(self.spec.scale_dtype).removeprefix("torch."),
            "rounding": self.spec.rounding,
            "error_feedback": self.error_feedback,
            "min_numel": self.min_numel,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Options, counters and this rank's residuals (and rounding generator state).

        Tensors and primitives only (``torch.distributed.checkpoint`` saves it as is). The
        per-rank part sits under ``ranks[str(global rank)]``: residuals differ between
        ranks, and DCP keeps one copy of a tensor that every rank saves under the same key.
        With error feedback every bound parameter has an entry (zeros before its first
        step), so a fresh state's ``state_dict()`` is a complete template for ``dcp.load``.
        The residuals are the live tensors (as ``Module.state_dict`` returns)."""
        mine: dict[str, Any] = {"residuals": dict(self.residuals)}
        if self.spec.rounding == "stochastic":
            if self._generator is None and self._params:
                self.generator(next(iter(self._params.values())).device)
            if self._generator is not None:
                mine["rng"] = self._generator.get_state()
        out: dict[str, Any] = {
            "version": _STATE_VERSION,
            "options": self._options(),
            "steps": self.steps,
            "buckets_seen": self.buckets_seen,
            "ranks": {str(global_rank()): mine},
        }
        if self.guard is not None and callable(getattr(self.guard, "state_dict", None)):
            out["guard"] = self.guard.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, after checking every option, key and
        shape against this state (ValueError saying what differs)."""
        where = "Int8AllReduceState.load_state_dict"
        check_state(
            state,
            where,
            version=_STATE_VERSION,
            required={"version", "options", "steps", "buckets_seen", "ranks"},
            optional={"guard"},
            options=self._options(),
            what="Int8AllReduceState.state_dict()",
        )
        steps = expect_int(state["steps"], f"{where}: steps", low=0)
        buckets = expect_int(state["buckets_seen"], f"{where}: buckets_seen", low=0)
        ranks = state["ranks"]
        rank = str(global_rank())
        if not isinstance(ranks, Mapping) or rank not in ranks:
            have = sorted(ranks) if isinstance(ranks, Mapping) else ranks
            raise ValueError(f"{where}: the state holds ranks {have}, not this rank ({rank})")
        mine = ranks[rank]
        if not isinstance(mine, Mapping) or "residuals" not in mine:
            raise ValueError(f"{where}: ranks[{rank!r}] lacks 'residuals'")
        res = mine["residuals"]
        if not isinstance(res, Mapping):
            raise TypeError(f"{where}: residuals must be a dict of tensors")
        if self.error_feedback and not self._params:
            raise ValueError(
                f"{where}: error feedback is on but the parameter names are unknown: pass "
                "model= to Int8AllReduceState (or call bind) before loading"
            )
        expected = set(self._params) if self.error_feedback else set()
        if set(res) != expected:
            extra, lost = sorted(set(res) - expected), sorted(expected - set(res))
            raise ValueError(
                f"{where}: residual keys differ from this model's parameters: unexpected "
                f"{extra[:5]}{'...' if len(extra) > 5 else ''}, missing "
                f"{lost[:5]}{'...' if len(lost) > 5 else ''}"
            )
        for k, t in res.items():
            p = self._params[k]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != p.shape:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t)
                raise ValueError(
                    f"{where}: residual {k!r} is {got}, parameter is {tuple(p.shape)} float32"
                )
        if "rng" in mine and self.spec.rounding == "stochastic":
            rng = mine["rng"]
            dev = next(iter(self._params.values())).device if self._params else "cpu"
            g = torch.Generator(device=dev)
            g.set_state(rng)
            self._generator = g
        if "guard" in state and self.guard is not None:
            self.guard.load_state_dict(state["guard"])
        for k, t in res.items():
            self.residuals[k].copy_(t)
        self.steps, self.buckets_seen = steps, buckets
        self._verified = False  # exchange again: another rank may not have loaded

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["process_group"] = None  # process groups do not pickle; reattach after loading
        d["_generator"] = None
        return d


def _resolve(state: Any) -> tuple[dist.ProcessGroup | None, Int8AllReduceState]:
    if isinstance(state, Int8AllReduceState):
        return state.process_group, state
    if state is None or isinstance(state, dist.ProcessGroup):
        return state, Int8AllReduceState(state)
    raise TypeError(
        "int8_allreduce state must be None, a ProcessGroup or an agoq Int8AllReduceState, "
        f"got {type(state).__name__}"
    )


def _full_precision(buf: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> None:
    # DDP's default hook: divide first (no overflow near the fp32 maximum), then sum.
    buf.div_(world)
    dist.all_reduce(buf, group=group)


def int8_allreduce(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket over the group with the int8 all-reduce.

    ``state``: None (default group), a ProcessGroup, or an :class:`Int8AllReduceState`.
    Collectives run and complete in the calling thread; the returned Future is already set.
    A float64 bucket raises TypeError. In compiled DDP (``bucket`` is then a
    ``(grad, param)`` tuple) or while compiling, functional collectives are used and a
    tensor is returned, as DDP expects there; error feedback, the settings check and the
    numerics guard are not applied on that path.
    """
    group, st = _resolve(state)
    if isinstance(bucket, tuple) or torch.compiler.is_compiling():
        grad = bucket[0] if isinstance(bucket, tuple) else bucket.buffer()
        pg = group if group is not None else dist.group.WORLD
        out = int8_all_reduce_functional(grad, pg, spec=st.spec)
        return grad.copy_(out) if isinstance(bucket, tuple) else out
    buf = bucket.buffer()
    check_grad_dtype(buf.dtype, "int8_allreduce (DDP bucket)")
    if not st._verified:
        st._verify(bucket)
    index = bucket.index()
    if index == 0:
        st.steps += 1
    st.buckets_seen = max(st.buckets_seen, index + 1)
    step = st.steps - 1  # 0-based number of the step this bucket belongs to
    st.calls += 1
    world = dist.get_world_size(group)
    name = f"grad/bucket{index}"
    guard = st.guard
    if buf.numel() < st.min_numel or (guard is not None and guard.is_fallback(name)):
        if st.error_feedback:  # flush what int8 still owed these parameters
            residual, slots = st._bucket_residual(bucket)
            buf.add_(residual.to(buf.dtype))
            st._store_residual(residual.zero_(), slots)
        _full_precision(buf, group, world)
    else:
        residual, slots = st._bucket_residual(bucket) if st.error_feedback else (None, None)
        # One bucket per check step, round-robin over the buckets seen so far: every rank
        # has the same counters, so every rank checks the same bucket.
        check = (
            guard is not None
            and step > 0  # DDP's step-0 buckets are provisional: it rebuilds them after
            and guard.due(step)
            and index == (step // guard.every) % max(st.buckets_seen, 1)
        )
        ref = None
        if check:
            ref = buf.to(torch.float32, copy=True)
            _full_precision(ref, group, world)
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
        if ref is not None:
            # Both results are identical on every rank (gathered / all-reduced), so is the
            # error, and so is the guard's decision: no extra communication needed.
            guard.observe(name, relative_rms(buf, ref), step=step)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


__all__ = ["DEFAULT_SPEC", "Int8AllReduceState", "int8_allreduce"]
