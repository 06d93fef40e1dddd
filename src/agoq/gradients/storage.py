"""8-bit gradient storage between micro-batches (AGoQ's Q-main-gradient).

With gradient accumulation the full-precision gradient normally lives in ``p.grad`` from the
first micro-batch's backward to the optimizer step. :class:`Int8GradStore` holds it in int8
instead: after each micro-batch's backward it dequantizes its accumulator, adds ``p.grad`` in
fp32, requantizes and sets ``p.grad = None``, so between micro-batches only the int8 payload
and its block scales (and, with ``compensation="residual"``, a second int8 tensor) are held::

    store = Int8GradStore(ddp)             # or any parameters
    for mb in micro_batches[:-1]:
        with ddp.no_sync():
            loss_fn(ddp, mb).backward()
        store.accumulate()                 # p.grad -> int8, p.grad = None
    store.materialize()                    # int8 -> p.grad, store cleared
    loss_fn(ddp, micro_batches[-1]).backward()   # adds on top; DDP reduces here
    optimizer.step()

or automatically, with post-accumulate-grad hooks (``materialize()`` runs on exit)::

    with store.accumulating():
        for mb in micro_batches[:-1]:
            with ddp.no_sync():
                loss_fn(ddp, mb).backward()
    loss_fn(ddp, micro_batches[-1]).backward()

Every requantization rounds the running sum, so without compensation the error of the
accumulated gradient grows with the number of micro-batches K, like ``sqrt(K)`` (measured on
a LLaMA: 0.5 % relative RMS at K = 1, 1.6 % at K = 16, 2.7 % at K = 64).
``compensation="residual"`` (the default) keeps each requantization's error in a second int8
tensor and adds it back at the next accumulation; what is lost is only the residual's own
rounding, second order (2e-5 at K = 1, 1e-4 at K = 64), at twice the bytes (still half of
fp32). ``compensation="stochastic"`` rounds stochastically: unbiased, so gradients smaller
than half a step are not rounded away, but its error grows like ``sqrt(K)`` too.

Under DDP, only ``no_sync`` micro-batches may go through the store: the synchronizing
backward must leave ``p.grad`` to DDP's reducer (materialize before it, as above). Built from
the DDP module itself (``Int8GradStore(ddp)``), the hooks refuse with an error a backward that
DDP synchronizes (they run before DDP's reducer hook and would hand it a missing gradient,
which DDP reduces as zeros). In a pipeline schedule without data parallelism, wrap
``schedule.step()`` in ``accumulating(materialize=False)`` and call ``materialize()`` before
the optimizer step: each micro-batch's backward (autograd's AccumulateGrad) fires the hooks of
the stage's parameters; a schedule that writes weight gradients itself (zero-bubble's
separate weight step) needs explicit ``accumulate()`` calls instead.

An exception inside ``accumulating()`` clears the store (nothing of the failed step is kept
for the next one to add to); :meth:`Int8GradStore.zero_grad` clears the store and the
parameters' ``.grad`` together, the call to use in place of ``optimizer.zero_grad()`` when a
step is abandoned between ``accumulate()`` and ``materialize()``. Gradients are checked
against their parameter (shape, device) and float64 is refused (the store is fp32 inside).

DTensor gradients (FSDP2's sharded gradients, tensor-parallel gradients) are stored by their
local tensor and rebuilt with the same mesh and placements. FSDP2 with
``set_requires_gradient_sync(False)`` keeps the unsharded gradient inside FSDP (not in the
sharded parameter's ``.grad``), out of the store's reach: a store built from an FSDP2 module
raises TypeError when it finds no gradient there. It can hold the reduce-scattered sharded
gradients between synchronizing micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._compat import ddp_sync_flag as _ddp_sync_flag
from .._validate import expect_bool, expect_int
from ..quant import Packed, QuantSpec, dequantize, quantize
from ._common import check_state, global_rank, unwrap
from .allreduce import check_grad_dtype

Compensation = Literal["none", "stochastic", "residual"]
COMPENSATIONS: tuple[str, ...] = ("none", "stochastic", "residual")

DEFAULT_STORE_SPEC = QuantSpec(bits=8, format="int", block=256)
_STATE_VERSION = 2


def _is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


@dataclass(frozen=True)
class _DistMeta:
    """What rebuilds a DTensor gradient from its local tensor."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


@dataclass
class _Slot:
    """The accumulated gradient of one parameter."""

    main: Packed
    residual: Packed | None
    dtype: torch.dtype  # dtype of the gradients that arrived, restored by materialize
    shape: torch.Size  # of the local gradient
    stride: tuple[int, ...]  # dense layout the flat accumulator is laid out in
    dist_meta: _DistMeta | None

    @property
    def nbytes(self) -> int:
        return self.main.nbytes + (self.residual.nbytes if self.residual is not None else 0)


def _flat_packed(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, numel: int
) -> Packed:
    return Packed(
        payload=payload,
        scales=scales,
        spec=spec,
        shape=torch.Size([numel]),
        stride=(1,),
        dtype=torch.float32,
        memory_order=True,
    )


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["scale_dtype"] = str(spec.scale_dtype).removeprefix("torch.")
    return d


class Int8GradStore:
    """Accumulates the gradients of ``params`` in 8 bits between micro-batches.

    ``params``: a module (its parameters, keyed by FQN in :meth:`state_dict`; a
    ``DistributedDataParallel`` module also arms the guard of :meth:`accumulating` against
    synchronized backwards), ``(name, parameter)`` pairs (``model.named_parameters()``), or
    parameters (keyed by position).
    ``spec``: the storage format (default int8, blocks of 256, fp32 scales; any
    :class:`~agoq.QuantSpec` works). ``compensation``: ``"residual"`` (default) keeps each
    requantization's error in a second tensor quantized with ``residual_spec`` (default
    int8 with its own block scales) and adds it back at the next accumulation;
    ``"stochastic"`` requantizes with unbiased stochastic rounding; ``"none"`` rounds to
    nearest. ``seed`` seeds stochastic rounding (default: the distributed rank, so ranks
    draw independent noise). Parameters that do not require grad are ignored; a parameter
    listed twice is stored once.

    Cost between micro-batches, per element: 8.125 bits ("none", "stochastic"), 16.25 bits
    ("residual", ~7e-5 relative error after 16 micro-batches); an int4 ``residual_spec``
    gives 12.25 bits and ~1e-3 (bf16 accumulation: 16 bits, ~5e-3).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.nn.Module,
        *,
        spec: QuantSpec = DEFAULT_STORE_SPEC,
        compensation: Compensation = "residual",
        residual_spec: QuantSpec | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be an agoq QuantSpec, got {type(spec).__name__}")
        if residual_spec is not None and not isinstance(residual_spec, QuantSpec):
            raise TypeError(
                f"residual_spec must be an agoq QuantSpec or None, got {type(residual_spec).__name__}"
            )
        if not isinstance(compensation, str) or compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
        if compensation == "stochastic":
            spec = dataclasses.replace(spec, rounding="stochastic")
        elif spec.rounding == "stochastic":
            raise ValueError(
                f"spec.rounding='stochastic' with compensation={compensation!r}: pass "
                "compensation='stochastic' to round stochastically"
            )
        if compensation == "residual":
            residual_spec = residual_spec or QuantSpec(bits=8, format="int", block=spec.block)
        elif residual_spec is not None:
            raise ValueError("residual_spec is only used with compensation='residual'")
        self.spec = spec
        self.compensation: Compensation = compensation
        self.residual_spec = residual_spec
        self._ddp: torch.nn.Module | None = None
        self._fsdp = False
        named: Iterable[tuple[str | None, Any]]
        if isinstance(params, torch.nn.Module):
            if isinstance(params, torch.nn.parallel.DistributedDataParallel):
                self._ddp = params
                _ddp_sync_flag(params)  # fail now, not at the first backward
            self._fsdp = _is_fsdp2(params)
            named = unwrap(params).named_parameters()
        elif isinstance(params, torch.Tensor):
            raise TypeError(
                "Int8GradStore takes an iterable of parameters or a module, not a tensor"
            )
        else:
            try:
                items = list(params)
            except TypeError:
                raise TypeError(
                    "Int8GradStore takes a module, parameters or (name, parameter) pairs, got "
                    f"{type(params).__name__}"
                ) from None
            named = [(x if isinstance(x, tuple) and len(x) == 2 else (None, x)) for x in items]
        self.params: list[torch.Tensor] = []
        self.names: list[str] = []
        seen: set[int] = set()
        for name, p in named:
            if not isinstance(p, torch.Tensor) or (name is not None and not isinstance(name, str)):
                raise TypeError(f"Int8GradStore takes tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.names.append(name if name is not None else str(len(self.params)))
                self.params.append(p)
        if len(set(self.names)) != len(self.names):
            raise ValueError("Int8GradStore: parameter names must be unique")
        if seed is None:
            seed = global_rank()
        self.seed = expect_int(seed, "Int8GradStore: seed")
        self._generators: dict[torch.device, torch.Generator] = {}
        if spec.rounding == "stochastic":  # created now: state_dict() is then a full template
            for p in self.params:
                self._generator(self._local_param(p).device)
        self._slots: dict[int, _Slot] = {}
        self._handles: list[Any] | None = None

    # ------------------------------------------------------------------ state

    @property
    def nbytes(self) -> int:
        """Exact bytes held: payloads and scales (and the residuals' payloads and scales)."""
        return sum(s.nbytes for s in self._slots.values())

    def __len__(self) -> int:
        """Number of parameters with a stored gradient."""
        return len(self._slots)

    def __repr__(self) -> str:
        return (
            f"Int8GradStore({len(self.params)} params, compensation={self.compensation!r}, "
            f"stored={len(self._slots)}, nbytes={self.nbytes})"
        )

    def clear(self) -> None:
        """Drop everything stored (``p.grad`` is left alone)."""
        self._slots.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the store *and* every parameter's ``.grad`` (``set_to_none=False``: zero
        it): what ``optimizer.zero_grad()`` does, plus the gradients held here, so an
        abandoned step leaves nothing behind for the next one to add to."""
        expect_bool(set_to_none, "Int8GradStore.zero_grad: set_to_none")
        self._slots.clear()
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    @staticmethod
    def _local_param(p: torch.Tensor) -> torch.Tensor:
        DTensor = _dtensor_type()
        return p.to_local() if DTensor is not None and isinstance(p, DTensor) else p

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.spec.rounding != "stochastic":
            return None
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    # ------------------------------------------------------------ accumulation

    def _local_grad(self, g: torch.Tensor) -> tuple[torch.Tensor, _DistMeta | None]:
        DTensor = _dtensor_type()
        if DTensor is not None and isinstance(g, DTensor):
            meta = _DistMeta(g.device_mesh, tuple(g.placements), g.shape, tuple(g.stride()))
            return g.to_local(), meta
        if g.layout != torch.strided:
            raise TypeError(f"Int8GradStore stores dense gradients only, got layout {g.layout}")
        if type(g) is not torch.Tensor:
            raise TypeError(
                f"Int8GradStore cannot store a gradient of tensor subclass {type(g).__name__} "
                "(plain tensors and DTensors only)"
            )
        return g, None

    def _value(self, slot: _Slot) -> torch.Tensor:
        """The stored accumulator as a fresh flat fp32 tensor."""
        acc = dequantize(slot.main)
        if slot.residual is not None:
            acc.add_(dequantize(slot.residual))
        return acc

    @torch.no_grad()  # also inside hooks of a create_graph backward
    def _fold(self, index: int) -> None:
        p = self.params[index]
        if p.grad is None:  # unused in this micro-batch
            return
        g, meta = self._local_grad(p.grad)
        check_grad_dtype(g.dtype, f"Int8GradStore ({self.names[index]})")
        local = self._local_param(p)
        if g.shape != local.shape:
            raise RuntimeError(
                f"Int8GradStore: gradient of {self.names[index]!r} has shape {tuple(g.shape)}, "
                f"the parameter {tuple(local.shape)}"
            )
        slot = self._slots.get(index)
        if slot is not None and (g.shape != slot.shape or g.device != slot.main.device):
            raise RuntimeError(
                f"parameter {self.names[index]!r}: gradient of shape {tuple(g.shape)} on "
                f"{g.device} does not match the stored one ({tuple(slot.shape)} on "
                f"{slot.main.device})"
            )
        if slot is None:
            # The accumulator is laid out like the gradient (dense strides; row-major if
            # the gradient is not dense), so materialize gives back the same layout and
            # DDP's bucket views see the strides they expect.
            shape, stride = g.shape, torch.empty_like(g, device="meta").stride()
            acc = torch.empty(g.numel(), dtype=torch.float32, device=g.device)
            acc.as_strided(shape, stride).copy_(g)
        else:
            shape, stride = slot.shape, slot.stride
            acc = self._value(slot)  # residual added back here: error feedback
            acc.as_strided(shape, stride).add_(g)  # fp32 sum, whatever the grad dtype
        main = quantize(acc, self.spec, generator=self._generator(acc.device))
        residual = None
        if self.residual_spec is not None:
            # acc is our own temporary: turn it into the requantization error in place.
            residual = quantize(acc.sub_(dequantize(main)), self.residual_spec)
        self._slots[index] = _Slot(main, residual, g.dtype, shape, stride, meta)
        p.grad = None

    def accumulate(self) -> None:
        """Fold every ``p.grad`` into the store and set ``p.grad = None``."""
        if self._fsdp and all(p.grad is None for p in self.params):
            raise TypeError(
                "Int8GradStore: the FSDP2 module's sharded parameters have no gradient. "
                "With set_requires_gradient_sync(False), FSDP2 keeps the unsharded gradient "
                "inside FSDP, out of the store's reach; the store can hold the reduce-scattered "
                "sharded gradients of synchronizing micro-batches only"
            )
        for i in range(len(self.params)):
            self._fold(i)

    @contextlib.contextmanager
    def accumulating(self, materialize: bool = True) -> Iterator[Int8GradStore]:
        """Accumulate automatically after each backward while the context is open.

        A post-accumulate-grad hook on every parameter folds its gradient into the store as
        soon as autograd has written it (so the full-precision gradient of one parameter
        lives only briefly, not the whole model's). On a clean exit the hooks are removed
        and, if ``materialize``, :meth:`materialize` runs. If the body raises, the store is
        cleared (the failed step's partial sum must not reach the next step) and the
        exception propagates. Backward passes that write ``p.grad`` without autograd's
        AccumulateGrad (e.g. a pipeline schedule's separate weight-gradient step) do not fire
        the hooks: call :meth:`accumulate` after them.
        """
        expect_bool(materialize, "Int8GradStore.accumulating: materialize")
        if self._handles is not None:
            raise RuntimeError("Int8GradStore.accumulating() is already active")
        self._handles = [
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._hook(i))
            for i, p in enumerate(self.params)
        ]
        try:
            yield self
        except BaseException:
            self.clear()
            raise
        finally:
            for h in self._handles:
                h.remove()
            self._handles = None
        if materialize:
            self.materialize()

    def _hook(self, index: int) -> None:
        # DDP decides at forward time whether the backward is reduced; its reducer's hook
        # runs after ours, so taking p.grad here would make DDP reduce zeros.
        if self._ddp is not None and _ddp_sync_flag(self._ddp):
            raise RuntimeError(
                "Int8GradStore.accumulating(): DDP synchronizes this backward (its forward "
                "ran outside no_sync()), so the store must not take the gradients: leave the "
                "accumulating() context (it materializes) before the synchronizing micro-batch"
            )
        self._fold(index)

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the accumulated gradients into ``p.grad`` and clear the store.

        A ``p.grad`` already present (the last micro-batch's) is added to in place; otherwise
        ``p.grad`` becomes a new tensor of the stored gradients' dtype and layout.
        """
        for i, p in enumerate(self.params):
            slot = self._slots.pop(i, None)
            if slot is None:
                continue
            acc = self._value(slot).as_strided(slot.shape, slot.stride)
            if p.grad is not None:
                g, _ = self._local_grad(p.grad)
                g.add_(acc)
                continue
            out = acc.to(slot.dtype)
            if slot.dist_meta is not None:
                m = slot.dist_meta
                out = _dtensor_type().from_local(
                    out, m.mesh, m.placements, run_check=False, shape=m.shape, stride=m.stride
                )
            p.grad = out

    @torch.no_grad()
    def read(self) -> list[torch.Tensor | None]:
        """The stored gradients (fp32 local tensors), without clearing the store."""
        out: list[torch.Tensor | None] = []
        for i in range(len(self.params)):
            slot = self._slots.get(i)
            out.append(
                None if slot is None else self._value(slot).as_strided(slot.shape, slot.stride)
            )
        return out

    # ------------------------------------------------------------ checkpointing

    def _options(self) -> dict[str, Any]:
        return {
            "spec": _spec_dict(self.spec),
            "compensation": self.compensation,
            "residual_spec": None if self.residual_spec is None else _spec_dict(self.residual_spec),
        }

    def _template(self, index: int) -> dict[str, Any]:
        """The entry of a parameter with nothing stored: zero tensors of the stored sizes."""
        local = self._local_param(self.params[index])
        n, dev = local.numel(), local.device
        d: dict[str, Any] = {
            "stored": False,
            "payload": torch.zeros(self.spec.payload_nbytes(n), dtype=torch.uint8, device=dev),
            "scales": torch.zeros(
                -(-n // self.spec.block), dtype=self.spec.scale_dtype, device=dev
            ),
            "dtype": str(local.dtype).removeprefix("torch."),
            "shape": list(local.shape),
            "stride": list(torch.empty_like(local, device="meta").stride()),
        }
        p = self.params[index]
        if local is not p:  # a DTensor parameter: its gradient is rebuilt as one
            d["dtensor"] = {
                "placements": list(p.placements),
                "shape": list(p.shape),
                "stride": list(p.stride()),
            }
        if self.residual_spec is not None:
            rs = self.residual_spec
            d["residual_payload"] = torch.zeros(rs.payload_nbytes(n), dtype=torch.uint8, device=dev)
            d["residual_scales"] = torch.zeros(-(-n // rs.block), dtype=rs.scale_dtype, device=dev)
        return d

    def state_dict(self) -> dict[str, Any]:
        """Options and, under ``ranks[str(global rank)]``, every parameter's stored payload
        and scales (keyed by FQN, or position for a parameter list) and the rounding
        generators.

        Tensors and primitives only, with the same keys and shapes whether or not anything
        is stored (``stored`` says which): a fresh store's ``state_dict()`` is a complete
        template for ``torch.distributed.checkpoint.load``. Per rank because the stored
        gradients differ between ranks (DDP ``no_sync`` micro-batches), and DCP keeps one
        copy of a tensor that every rank saves under the same key."""
        slots: dict[str, Any] = {}
        for i, name in enumerate(self.names):
            s = self._slots.get(i)
            if s is None:
                slots[name] = self._template(i)
                continue
            d: dict[str, Any] = {
                "stored": True,
                "payload": s.main.payload,
                "scales": s.main.scales,
                "dtype": str(s.dtype).removeprefix("torch."),
                "shape": list(s.shape),
                "stride": list(s.stride),
            }
            if s.residual is not None:
                d["residual_payload"] = s.residual.payload
                d["residual_scales"] = s.residual.scales
            if s.dist_meta is not None:
                d["dtensor"] = {
                    "placements": list(s.dist_meta.placements),
                    "shape": list(s.dist_meta.shape),
                    "stride": list(s.dist_meta.stride),
                }
            slots[name] = d
        rng = {str(dev): g.get_state() for dev, g in self._generators.items()}
        return {
            "version": _STATE_VERSION,
            "options": self._options(),
            "ranks": {str(global_rank()): {"slots": slots, "rng": rng}},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; every option, key, size and dtype is
        checked against this store first (ValueError saying what differs)."""
        where = "Int8GradStore.load_state_dict"
        check_state(
            state,
            where,
            version=_STATE_VERSION,
            required={"version", "options", "ranks"},
            optional=set(),
            options=self._options(),
            what="Int8GradStore.state_dict()",
        )
        rank = str(global_rank())
        ranks = state["ranks"]
        if not isinstance(ranks, Mapping) or rank not in ranks:
            have = sorted(ranks) if isinstance(ranks, Mapping) else ranks
            raise ValueError(f"{where}: the state holds ranks {have}, not this rank ({rank})")
        mine = ranks[rank]
        if not isinstance(mine, Mapping) or not {"slots", "rng"} <= set(mine):
            raise ValueError(f"{where}: ranks[{rank!r}] must hold 'slots' and 'rng'")
        saved = mine["slots"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"{where}: 'slots' must be a dict")
        if set(saved) != set(self.names):
            extra = sorted(set(saved) - set(self.names))
            lost = sorted(set(self.names) - set(saved))
            raise ValueError(
                f"{where}: parameter keys differ from this store's: unexpected {extra[:5]}, "
                f"missing {lost[:5]}"
            )
        slots: dict[int, _Slot] = {}
        for i, name in enumerate(self.names):
            d = saved[name]
            want = self._template(i)
            for k in want:
                if k not in d:
                    raise ValueError(f"{where}: {name!r} lacks {k!r}")
            if not isinstance(d["stored"], bool):
                raise TypeError(f"{where}: {name!r}: 'stored' must be a bool")
            for k, t in want.items():
                if isinstance(t, torch.Tensor):
                    got = d[k]
                    if (
                        not isinstance(got, torch.Tensor)
                        or got.shape != t.shape
                        or got.dtype != t.dtype
                    ):
                        desc = (
                            (tuple(got.shape), got.dtype) if isinstance(got, torch.Tensor) else got
                        )
                        raise ValueError(
                            f"{where}: {name!r} {k} is {desc}, this store needs "
                            f"{(tuple(t.shape), t.dtype)} (different parameter or format?)"
                        )
            if list(d["shape"]) != want["shape"]:
                raise ValueError(
                    f"{where}: {name!r} was saved with shape {list(d['shape'])}, the parameter "
                    f"(local) shape is {want['shape']}"
                )
            if not d["stored"]:
                continue
            p = self.params[i]
            meta = None
            is_dt = _dtensor_type() is not None and isinstance(p, _dtensor_type())
            if ("dtensor" in d) != is_dt:
                raise TypeError(
                    f"{where}: {name!r} was {'' if 'dtensor' in d else 'not '}a DTensor when "
                    f"saved and is {'' if is_dt else 'not '}one now"
                )
            if is_dt:
                t = d["dtensor"]
                meta = _DistMeta(
                    p.device_mesh,
                    tuple(t["placements"]),
                    torch.Size(t["shape"]),
                    tuple(t["stride"]),
                )
            dtype = getattr(torch, str(d["dtype"]), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{where}: {name!r} has an unknown gradient dtype {d['dtype']!r}")
            device = self._local_param(p).device
            numel = torch.Size(d["shape"]).numel()
            main = _flat_packed(d["payload"].to(device), d["scales"].to(device), self.spec, numel)
            residual = None
            if self.residual_spec is not None:
                residual = _flat_packed(
                    d["residual_payload"].to(device),
                    d["residual_scales"].to(device),
                    self.residual_spec,
                    numel,
                )
            shape = torch.Size(d["shape"])
            slots[i] = _Slot(main, residual, dtype, shape, tuple(d["stride"]), meta)
        gens = {}
        for dev, rng in dict(mine["rng"]).items():
            device = torch.device(dev)
            g = torch.Generator(device=device)
            g.set_state(rng)
            gens[device] = g
        self._slots = slots
        self._generators = gens
