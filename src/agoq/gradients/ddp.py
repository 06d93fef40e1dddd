"""``ddp_model.register_comm_hook(state, agoq.int8_allreduce)``: the int8 all-reduce as a DDP
communication hook, for eager DDP, compiled models (DDPOptimizer) and compiled DDP
(``optimize_ddp="python_reducer"``, where the hook gets ``(grad, param)`` per parameter).

The hook overlaps the reduction with backward: it returns a Future at once, and a comm
worker thread of the state reduces the buckets, first in first out, on a process group of
its own (see :class:`_CommWorker` for why each of those three is needed: what deadlocked
before). On CUDA the worker runs on a side stream that waits for the gradients of the
bucket, and the Future carries that stream to DDP.

At its first bucket the worker exchanges a fingerprint of the settings with the other ranks
(one all_gather of a few integers) and raises on every rank, naming the fields, when they
differ: ranks with different block, scale dtype, rounding, ``min_numel``, error feedback,
numerics guard or step counter would otherwise reduce different layouts (silently wrong
gradients or a hang).

No ``from __future__ import annotations`` here: DDP checks the hook's annotations at
registration and rejects anything but ``dist.GradBucket`` / ``Future[Tensor]`` objects."""

import datetime
import queue
import struct
import threading
import traceback
import weakref
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._compat import group_timeout, queue_backward_callback
from .._validate import expect_bool, expect_int, expect_str
from ..quant import QuantSpec
from ._common import check_state, global_rank, unwrap
from .allreduce import (
    DEFAULT_SPEC,
    Scratch,
    check_fields,
    check_grad_dtype,
    gather_fields,
    int8_all_reduce_functional,
    padded_numel,
    placement,
    reduce_flat,
    relative_rms,
)

# Bump when the hook's collective sequence or math changes: ranks running different agoq
# versions then refuse to reduce together. 3: payload + scales in one wire, on the state's
# own process group, from the comm worker.
PROTOCOL = 3
_STATE_VERSION = 2
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
_ROUNDINGS = ("nearest", "stochastic")
_ACTION_CODES = {"fallback": 1, "warn": 2, "raise": 3}
_OPTIONS = ("block", "scale_dtype", "rounding", "error_feedback", "min_numel", "seed")


class _CommWorker:
    """One daemon thread that runs the jobs it is given one after the other (FIFO).

    What deadlocked before, and why each part of this design is needed:

    * Chaining the second collective from ``Future.then`` of the first: under gloo the
      callback runs on one of the process group's own worker threads (2 by default). A
      callback that waits for the all-gather it issued blocks that thread, and the
      all-gather is queued behind it for the same 2 threads: with 2 buckets in flight both
      threads wait for work only they could run (reproduced: 12 small buckets hang in step
      0). Not waiting does not help: collectives issued from completion callbacks are
      issued in whatever order the callbacks happen to run on each rank, interleaved with
      the next bucket's all-to-all from the autograd thread; gloo pairs collectives by
      issue order, so the ranks pair different collectives and hang. Here a thread that
      belongs to agoq issues and waits, and nothing else issues agoq's collectives.
    * FIFO: DDP calls the hook for the buckets in the same order on every rank, and jobs
      run in submission order, so every rank issues the same sequence of collectives.
    * A process group of its own (:func:`_comm_group`): DDP issues collectives of its own
      on its group from the autograd thread while buckets are in flight (the
      ``find_unused_parameters`` bitmap all-reduce after the last bucket), and so may the
      user's code; on a shared group those would interleave with the worker's in a
      different order on each rank.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (it handles its own exceptions)."""
        with self._idle:
            self._pending += 1
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # noqa: BLE001 - jobs report their errors; this is a bug
                traceback.print_exc()  # keep the thread alive for the buckets behind it
            finally:
                del job  # it holds the state: let an abandoned state be collected
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every submitted job has finished; False on timeout."""
        if threading.current_thread() is self._thread:
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, join: bool = True) -> None:
        """Let the queued jobs finish, then end the thread (``join``: wait for it, at most a
        minute)."""
        self._queue.put(None)
        if join and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        """Whether the thread is still running."""
        return self._thread.is_alive()


def _comm_group(parent: dist.ProcessGroup, device: torch.device) -> dist.ProcessGroup:
    """A new process group over ``parent``'s ranks, with its timeout and backend.

    Created from the first bucket's hook, which every rank of ``parent`` runs at the same
    point. When ``parent`` spans the whole job, a plain ``new_group`` (every rank enters, as
    it requires; the name comes from torch's group counter, which thus stays equal on all
    ranks). For a proper subgroup only its members run the hook, so
    ``use_local_synchronization=True``: non-members need not enter, and the name is a hash
    of the ranks and of the number of groups this process has, so two states over the same
    ranks get two groups (members must have created the same groups before, as torch
    requires for this option)."""
    ranks = dist.get_process_group_ranks(parent)
    kw: dict[str, Any] = {"backend": dist.get_backend(parent)}
    timeout = group_timeout(parent, device)
    if timeout is not None:
        kw["timeout"] = timeout
    if len(ranks) == dist.get_world_size():
        return dist.new_group(ranks=ranks, group_desc="agoq_int8_allreduce", **kw)
    return dist.new_group(
        ranks=ranks, use_local_synchronization=True, group_desc="agoq_int8_allreduce", **kw
    )


class _Job:
    """What the worker needs of one bucket, taken at hook time (the GradBucket itself is
    DDP's and only valid during the hook)."""

    __slots__ = ("buf", "index", "segments", "params", "fut", "event")

    def __init__(self, bucket: "dist.GradBucket") -> None:
        buf = bucket.buffer()
        base, size = buf.data_ptr(), buf.element_size()
        self.buf = buf
        self.index = bucket.index()
        self.segments = tuple(
            ((g.data_ptr() - base) // size, g.numel()) for g in bucket.gradients()
        )
        self.params = list(bucket.parameters())
        self.event: Any = None
        if buf.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(buf.device))
            self.fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(
                devices=[buf.device]
            )
        else:
            self.fut = torch.futures.Future()


class _Broken(RuntimeError):
    """A collective of an earlier bucket failed: the group may be out of step."""


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

    At its first bucket the state creates a process group of its own over the group's ranks
    (same backend and timeout) and a daemon comm thread that reduces the buckets FIFO while
    backward goes on. :meth:`close` (or garbage collection) stops the thread;
    :meth:`state_dict` and :meth:`load_state_dict` wait for buckets in flight. An error in
    the worker is raised by ``backward()`` (the original exception, e.g. ``NumericsError``),
    never a hang: collectives time out with the group's timeout. After a collective failed
    the state refuses to reduce again (the ranks may be out of step): build a new one.
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
        self._comm: dist.ProcessGroup | None = None
        self._device = torch.device("cpu")
        self._worker: _CommWorker | None = None
        self._finalizer: weakref.finalize | None = None
        self._streams: dict[torch.device, Any] = {}
        self._errors: list[BaseException] = []  # this backward's, raised at its end
        self._scratch = Scratch()
        # Per bucket index: (parameter names, the flat residual laid out like the bucket's
        # aligned buffer). ``residuals[name]`` are views into it, so error feedback reads and
        # writes it in place, with no gather or scatter per step.
        self._flat_res: dict[int, tuple[tuple[str, ...], torch.Tensor]] = {}
        self._broken: BaseException | None = None
        self._armed = False
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

    def _fingerprint(self, numel: int, dtype: torch.dtype) -> list[tuple[str, int]]:
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
            ("first bucket's numel (bucket_cap_mb?)", numel),
            ("gradient dtype", _DTYPE_CODES.get(dtype, 0)),
        ]

    # -------------------------------------------------------------- residuals

    def _residuals_of(self, job: _Job) -> list[torch.Tensor]:
        """The residual of each parameter of the bucket, in bucket order (live tensors)."""
        if not self._names:
            raise ValueError(
                "Int8AllReduceState(error_feedback=True) needs the parameter names to key its "
                "residuals: pass model=ddp_model to Int8AllReduceState or call "
                "state.bind(ddp_model) before training"
            )
        out = []
        for p in job.params:
            key = self._names.get(id(p))
            if key is None:
                raise ValueError(
                    f"Int8AllReduceState: a parameter of shape {tuple(p.shape)} in DDP's bucket "
                    "is not in the model bound with model= / bind(); bind the DDP module "
                    "that this hook is registered on"
                )
            out.append(self.residuals[key])
        return out

    def _bucket_residual(self, job: _Job, world: int) -> torch.Tensor:
        """The bucket's flat residual (see ``_flat_res``), re-laid out when DDP's bucket
        changed (it rebuilds its buckets after the first step)."""
        params = self._residuals_of(job)  # validates the names
        keys = tuple(self._names[id(p)] for p in job.params)
        place = placement(job.segments, self.spec.block)
        padded = padded_numel(place, world, self.spec.block)
        hit = self._flat_res.get(job.index)
        if hit is not None and hit[0] == keys and hit[1].numel() == padded:
            flat = hit[1]
            base, size = flat.data_ptr(), flat.element_size()
            if all(r.data_ptr() == base + d * size for r, d in zip(params, place.dst, strict=True)):
                return flat
        flat = torch.zeros(padded, dtype=torch.float32, device=job.buf.device)
        for key, r, d in zip(keys, params, place.dst, strict=True):
            view = flat[d : d + r.numel()]
            view.copy_(r.reshape(-1))
            self.residuals[key] = view.view(r.shape)
        self._flat_res[job.index] = (keys, flat)
        return flat

    # ------------------------------------------------------------ the worker

    def _start(self, device: torch.device) -> _CommWorker:
        """The comm worker, started (with the state's own process group) at the first bucket."""
        if self._worker is None or not self._worker.alive:
            if self._comm is None:
                parent = self.process_group if self.process_group is not None else dist.group.WORLD
                self._comm = _comm_group(parent, device)
                self._device = device
            self._worker = _CommWorker(f"agoq-int8-allreduce-{global_rank()}")
            # Collected without close(): end the thread, without waiting in the collector.
            self._finalizer = weakref.finalize(self, self._worker.stop, False)
            self._finalizer.atexit = False  # a daemon thread: it ends with the process
        return self._worker

    def _wait_idle(self) -> None:
        """Wait for the buckets in flight (at most the group's timeout, plus a minute)."""
        worker = self._worker
        if worker is None:
            return
        limit = group_timeout(self._comm, self._device) if self._comm is not None else None
        seconds = (limit or datetime.timedelta(minutes=30)).total_seconds() + 60
        if not worker.wait_idle(seconds):
            raise RuntimeError(
                f"Int8AllReduceState: buckets still in flight after {seconds:.0f} s (the "
                "process group's timeout has passed): a rank is stuck"
            )

    def close(self) -> None:
        """Wait for the buckets in flight, then stop the comm worker thread (idempotent; a
        later bucket starts a new thread on the same process group)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.wait_idle(None)
            if self._finalizer is not None:
                self._finalizer.detach()
            worker.stop()

    def _submit(self, bucket: "dist.GradBucket") -> "torch.futures.Future[torch.Tensor]":
        job = _Job(bucket)
        worker = self._start(job.buf.device)
        if not self._armed:
            # Re-raise a worker error from backward() with its own type (DDP would turn
            # it into "Unable to cast ... to Tensor"); queued before DDP's finalize callback.
            self._armed = queue_backward_callback(self._end_of_backward)
        worker.submit(lambda: self._run(job))
        return job.fut

    def _end_of_backward(self) -> None:
        try:
            self._wait_idle()
        finally:
            self._armed = False
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def _run(self, job: _Job) -> None:
        """The worker's part for one bucket: everything in FIFO order."""
        stage = {"in_collective": False}
        try:
            if self._broken is not None:
                raise RuntimeError(
                    "Int8AllReduceState: an earlier bucket's collective failed, so the ranks "
                    "may be out of step; this state does not reduce any more: build a new "
                    "state (and DDP model) to go on"
                ) from self._broken
            if job.event is None:
                self._reduce(job, stage)
                job.fut.set_result(job.buf)
                return
            dev = job.buf.device
            stream = self._streams.get(dev)
            if stream is None:
                stream = self._streams[dev] = torch.cuda.Stream(dev)
            with torch.cuda.device(dev), torch.cuda.stream(stream):
                stream.wait_event(job.event)  # the bucket's gradients are written
                self._reduce(job, stage)
                job.fut.set_result(job.buf)  # records the side stream for DDP to wait on
        except BaseException as e:  # noqa: BLE001 - handed to backward(), never lost
            if stage["in_collective"] and self._broken is None:
                self._broken = e
            if self._armed:
                self._errors.append(e)
            err = e if isinstance(e, Exception) else RuntimeError(repr(e))
            try:
                job.fut.set_exception(err)
            except Exception:  # noqa: BLE001 - an exception object that does not pickle
                job.fut.set_exception(RuntimeError(f"{type(e).__name__}: {e}"))

    def _reduce(self, job: _Job, stage: dict[str, bool]) -> None:
        buf = job.buf
        group = self._comm
        if not self._verified:
            fields = self._fingerprint(buf.numel(), buf.dtype)
            stage["in_collective"] = True
            table = gather_fields(fields, group, buf.device)
            stage["in_collective"] = False
            check_fields("int8_allreduce (Int8AllReduceState)", fields, table)
            self._verified = True
        index = job.index
        if index == 0:
            self.steps += 1
        self.buckets_seen = max(self.buckets_seen, index + 1)
        step = self.steps - 1  # 0-based number of the step this bucket belongs to
        self.calls += 1
        world = dist.get_world_size(group)
        name = f"grad/bucket{index}"
        guard = self.guard
        flat = buf.view(-1)
        if buf.numel() < self.min_numel or (guard is not None and guard.is_fallback(name)):
            if self.error_feedback:  # flush what int8 still owed these parameters
                for r, (off, n) in zip(self._residuals_of(job), job.segments, strict=True):
                    flat[off : off + n].add_(r.view(-1).to(buf.dtype))
                    r.zero_()
            stage["in_collective"] = True
            _full_precision(buf, group, world)
            stage["in_collective"] = False
            return
        residual = self._bucket_residual(job, world) if self.error_feedback else None
        # One bucket per check step, round-robin over the buckets seen so far: every rank
        # has the same counters, so every rank checks the same bucket.
        check = (
            guard is not None
            and step > 0  # DDP's step-0 buckets are provisional: it rebuilds them after
            and guard.due(step)
            and index == (step // guard.every) % max(self.buckets_seen, 1)
        )
        stage["in_collective"] = True
        ref = None
        if check:
            ref = buf.to(torch.float32, copy=True)
            _full_precision(ref, group, world)
        reduce_flat(
            flat,
            group,
            spec=self.spec,
            place=placement(job.segments, self.spec.block),
            generator=self.generator(buf.device),
            residual=residual,
            scratch=self._scratch,
        )
        stage["in_collective"] = False
        if ref is not None:
            # Both results are identical on every rank (gathered / all-reduced), so is the
            # error, and so is the guard's decision: no extra communication needed.
            guard.observe(name, relative_rms(buf, ref), step=step)

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
        The residuals are the live tensors (as ``Module.state_dict`` returns). Buckets in
        flight are waited for first."""
        self._wait_idle()
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
        shape against this state (ValueError saying what differs). Buckets in flight are
        waited for first."""
        self._wait_idle()
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
        # Threads, streams and groups do not pickle either; a copy starts its own.
        d.update(_comm=None, _worker=None, _finalizer=None, _streams={}, _errors=[])
        d.update(_scratch=Scratch(), _flat_res={})
        d.update(_broken=None, _armed=False)
        return d


# The states behind ``state=None`` / a bare ProcessGroup, one per group, so that such a
# hook also gets one comm worker and one fingerprint exchange rather than one per bucket.
_DEFAULT_STATES: dict[Any, "Int8AllReduceState"] = {}


def _resolve(state: Any) -> tuple[dist.ProcessGroup | None, Int8AllReduceState]:
    if isinstance(state, Int8AllReduceState):
        return state.process_group, state
    if state is None or isinstance(state, dist.ProcessGroup):
        key = state if state is not None else dist.group.WORLD
        st = _DEFAULT_STATES.get(key)
        if st is None:
            st = _DEFAULT_STATES[key] = Int8AllReduceState(state)
        return state, st
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
    Returns at once a Future that the state's comm worker completes when the bucket is
    reduced, so backward goes on meanwhile. A float64 bucket raises TypeError. In compiled
    DDP (``bucket`` is then a ``(grad, param)`` tuple) or while compiling, functional
    collectives are used and a tensor is returned, as DDP expects there; error feedback,
    the settings check and the numerics guard are not applied on that path.
    """
    group, st = _resolve(state)
    if isinstance(bucket, tuple) or torch.compiler.is_compiling():
        grad = bucket[0] if isinstance(bucket, tuple) else bucket.buffer()
        pg = group if group is not None else dist.group.WORLD
        out = int8_all_reduce_functional(grad, pg, spec=st.spec)
        return grad.copy_(out) if isinstance(bucket, tuple) else out
    check_grad_dtype(bucket.buffer().dtype, "int8_allreduce (DDP bucket)")
    return st._submit(bucket)


__all__ = ["DEFAULT_SPEC", "Int8AllReduceState", "int8_allreduce"]
