"""Pipeline-stage-aware activation bit-widths (DBCA-PP, paper section 2.3).

Under pipeline parallelism the ranks near the start of the pipeline hold more micro-batch
activations at once than those near the end, so they can afford fewer bits each.
:func:`inflight_microbatches` measures how many activation sets each rank holds at its peak,
by reading the action order of the real schedule in ``torch.distributed.pipelining``, and
:func:`stage_bits` turns those counts into per-rank bit-widths.

Everything here runs on CPU without a process group: schedules are built around light
stand-in stage objects that only carry the attributes the schedule constructors read.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._compat import TorchCompatError, pipeline_action, run_step_microbatches

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import _Action


class _Schedules:
    """``torch.distributed.pipelining.schedules``, imported at first use: it pulls in much
    of torch.distributed (private modules too), which ``import agoq`` must not."""

    def __getattr__(self, name: str) -> Any:
        from torch.distributed.pipelining import schedules

        return getattr(schedules, name)


_tsched = _Schedules()


def _action(stage_index: int, kind: Any, microbatch_index: int) -> _Action:
    return pipeline_action()(stage_index, kind, microbatch_index)


__all__ = [
    "inflight_microbatches",
    "quantize_stage",
    "rank_actions",
    "stage_bits",
    "supported_schedules",
]

# Class names looked up with getattr so that a torch build lacking one of them (older
# releases have no ScheduleDualPipeV, for instance) still imports this module.
_SCHEDULE_CLASS_NAMES = (
    "ScheduleGPipe",
    "Schedule1F1B",
    "ScheduleInterleaved1F1B",
    "ScheduleLoopedBFS",
    "ScheduleInterleavedZeroBubble",
    "ScheduleZBVZeroBubble",
    "ScheduleDualPipeV",
)
_EXTRA_ALIASES = {
    "zbv": "ScheduleZBVZeroBubble",
    "zb1p": "ScheduleInterleavedZeroBubble",
    "interleavedzb": "ScheduleInterleavedZeroBubble",
    "bfs": "ScheduleLoopedBFS",
}
# Schedules that place a rank's two chunks in a "V" (stages r and 2p-1-r) and only
# accept exactly two chunks per rank.
_V_SCHEDULE_NAMES = frozenset({"ScheduleZBVZeroBubble", "ScheduleDualPipeV"})


@functools.cache
def _schedules() -> dict[str, type]:
    return {
        name: cls
        for name in _SCHEDULE_CLASS_NAMES
        if (cls := getattr(_tsched, name, None)) is not None
    }


def _normalise(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


@functools.cache
def _name_table() -> dict[str, type]:
    schedules = _schedules()
    table: dict[str, type] = {}
    for name, cls in schedules.items():
        table[_normalise(name)] = cls
        table[_normalise(name.removeprefix("Schedule"))] = cls
    for alias, name in _EXTRA_ALIASES.items():
        if name in schedules:
            table[alias] = schedules[name]
    return table


def supported_schedules() -> list[str]:
    """Names of the torch schedule classes this module accepts in the installed torch."""
    return list(_schedules())


def _unsupported(schedule: object) -> ValueError:
    return ValueError(
        f"unsupported pipeline schedule {schedule!r}; supported classes: "
        f"{', '.join(_schedules())} (or their subclasses); accepted names "
        f"(case-insensitive): {', '.join(sorted(_name_table()))}"
    )


def _resolve_schedule(schedule: object) -> type:
    if isinstance(schedule, str):
        cls = _name_table().get(_normalise(schedule))
        if cls is None:
            raise _unsupported(schedule)
        return cls
    if isinstance(schedule, type) and any(issubclass(schedule, c) for c in _schedules().values()):
        return schedule
    raise _unsupported(schedule)


def _is_v_schedule(cls: type) -> bool:
    return any(issubclass(cls, _schedules()[n]) for n in _V_SCHEDULE_NAMES if n in _schedules())


def _check_positive_int(value: object, name: str) -> int:
    # bool is an int subclass; True as a stage count is almost certainly a bug.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _StandInStage:
    """Duck-typed replacement for ``_PipelineStageBase`` that owns no module or process group.

    Schedule constructors only read ``num_stages``, ``group_size``, ``group_rank`` and
    ``submod`` (and assign ``stage_index_to_group_rank``). The single-stage tracer also
    calls the compute and communication hooks below, which record compute and return no
    communication work.
    """

    def __init__(self, stage_index: int, num_stages: int, group_size: int, group_rank: int):
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_size = group_size
        self.group_rank = group_rank
        self.submod = None
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.has_backward = True
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.log: list[_Action] = []

    def get_fwd_recv_ops(self, *args: object, **kwargs: object) -> list:
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def forward_one_chunk(self, fwd_chunk_id: int, *args: object, **kwargs: object) -> None:
        self.log.append(_action(self.stage_index, _tsched.FORWARD, fwd_chunk_id))

    def backward_one_chunk(
        self, bwd_chunk_id: int, *args: object, full_backward: bool = True, **kwargs: object
    ) -> None:
        kind = _tsched.FULL_BACKWARD if full_backward else _tsched.BACKWARD_INPUT
        self.log.append(_action(self.stage_index, kind, bwd_chunk_id))

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: object, **kwargs: object) -> None:
        self.log.append(_action(self.stage_index, _tsched.BACKWARD_WEIGHT, bwd_chunk_id))

    def perform_reduce_grad(self, *args: object, **kwargs: object) -> None:
        pass

    def clear_runtime_states(self) -> None:
        pass


def _trace_single(cls: type, rank: int, num_stages: int, n_microbatches: int) -> list[_Action]:
    """Run the schedule's own ``_step_microbatches`` for one rank and record its compute."""
    stage = _StandInStage(rank, num_stages, num_stages, rank)
    sched = cls(stage, n_microbatches)
    run_step_microbatches(sched)
    return stage.log


def _simulate_single(cls: type, rank: int, num_stages: int, n_microbatches: int) -> list[_Action]:
    """Fallback order for GPipe / 1F1B, used only if tracing breaks on a different torch."""
    fwd = [_action(rank, _tsched.FORWARD, i) for i in range(n_microbatches)]
    bwd = [_action(rank, _tsched.FULL_BACKWARD, i) for i in range(n_microbatches)]
    if issubclass(cls, _tsched.ScheduleGPipe):
        # torch 2.13 ScheduleGPipe._step_microbatches: all forwards, then all backwards
        # (schedules.py, forward loop at line 905, backward loop at line 933).
        return fwd + bwd
    # torch 2.13 Schedule1F1B._step_microbatches (schedules.py lines 1052-1175: warmup at 1052,
    # 1B1F loop at 1100, cooldown at 1150):
    # warmup_chunks = min(m, p - stage_index) forwards, then alternate one backward and
    # one forward until the forwards run out, then drain the remaining backwards.
    warmup = min(n_microbatches, num_stages - rank)
    order = fwd[:warmup]
    for i in range(n_microbatches - warmup):
        order += [bwd[i], fwd[warmup + i]]
    return order + bwd[n_microbatches - warmup :]


def _single_stage_actions(
    cls: type, num_stages: int, n_microbatches: int
) -> dict[int, list[_Action]]:
    # PipelineScheduleSingle._get_pipeline_order exists in recent torch, but it is a
    # visualisation aid the runtime never executes, and in torch 2.13 its 1F1B order for
    # the last rank is wrong (it skips F0 and lists a forward past the last micro-batch).
    # The order that actually runs is procedural in _step_microbatches, so we execute
    # that with a recording stage.
    try:
        return {r: _trace_single(cls, r, num_stages, n_microbatches) for r in range(num_stages)}
    except (AttributeError, TypeError, TorchCompatError) as exc:
        if cls not in (_tsched.ScheduleGPipe, _tsched.Schedule1F1B):
            raise
        warnings.warn(
            f"could not trace {cls.__name__}._step_microbatches ({exc!r}); falling back "
            "to agoq's simulation of the torch 2.13 order",
            RuntimeWarning,
            stacklevel=4,
        )
        return {r: _simulate_single(cls, r, num_stages, n_microbatches) for r in range(num_stages)}


def _multi_stage_actions(
    cls: type, num_stages: int, n_microbatches: int, stages_per_rank: int
) -> dict[int, list[_Action]]:
    total = num_stages * stages_per_rank
    if _is_v_schedule(cls):
        local = [0, total - 1]
    else:
        local = [k * num_stages for k in range(stages_per_rank)]
    # Multi-stage constructors compute the order for *every* rank (pipeline_order), so a
    # single instance built as rank 0 suffices.
    stages = [_StandInStage(i, total, num_stages, 0) for i in local]
    sched = cls(stages, n_microbatches)
    # pipeline_order_with_comms is the list _PipelineScheduleRuntime._step_microbatches
    # iterates; its lowering passes only insert comm / unshard / reduce actions. Plain
    # PipelineScheduleMulti subclasses execute pipeline_order directly.
    order = getattr(sched, "pipeline_order_with_comms", None) or sched.pipeline_order
    return {rank: list(order[rank]) for rank in range(num_stages)}


def _compute_only(actions: Iterable[_Action | None]) -> list[_Action]:
    # OVERLAP_F_B runs its sub-actions one after another, in tuple order.
    out: list[_Action] = []
    for a in actions:
        if a is None:
            continue
        if a.computation_type == _tsched.OVERLAP_F_B and a.sub_actions:
            out.extend(a.sub_actions)
        elif a.computation_type in (
            _tsched.FORWARD,
            _tsched.FULL_BACKWARD,
            _tsched.BACKWARD_INPUT,
            _tsched.BACKWARD_WEIGHT,
        ):
            out.append(a)
    return out


def rank_actions(
    schedule: type | str,
    num_stages: int,
    n_microbatches: int,
    *,
    stages_per_rank: int = 1,
) -> dict[int, list[_Action]]:
    """Compute actions (F, I, W, B) each rank executes, in order, as torch ``_Action``s.

    Arguments are as for :func:`inflight_microbatches`. ``OVERLAP_F_B`` actions are expanded
    into their sub-actions; communication, unshard and grad-reduce actions are dropped.
    """
    cls = _resolve_schedule(schedule)
    num_stages = _check_positive_int(num_stages, "num_stages")
    n_microbatches = _check_positive_int(n_microbatches, "n_microbatches")
    stages_per_rank = _check_positive_int(stages_per_rank, "stages_per_rank")
    if issubclass(cls, _tsched.PipelineScheduleSingle):
        if stages_per_rank != 1:
            raise ValueError(
                f"{cls.__name__} runs one stage per rank; got stages_per_rank={stages_per_rank}"
            )
        raw = _single_stage_actions(cls, num_stages, n_microbatches)
    else:
        if _is_v_schedule(cls) and stages_per_rank != 2:
            raise ValueError(
                f"{cls.__name__} needs exactly 2 stages per rank (V placement); "
                f"got stages_per_rank={stages_per_rank}"
            )
        raw = _multi_stage_actions(cls, num_stages, n_microbatches, stages_per_rank)
    return {rank: _compute_only(actions) for rank, actions in raw.items()}


def _peak_inflight(actions: Iterable[_Action | None]) -> int:
    live: set[tuple[int, int]] = set()
    peak = 0
    for a in _compute_only(actions):
        key = (a.stage_index, a.microbatch_index)
        kind = a.computation_type
        if kind == _tsched.FORWARD:
            if key in live:
                raise RuntimeError(f"schedule runs forward {a} twice")
            live.add(key)
            peak = max(peak, len(live))
        elif key not in live:
            raise RuntimeError(f"schedule runs {a} without a live forward")
        elif kind in (_tsched.FULL_BACKWARD, _tsched.BACKWARD_WEIGHT):
            live.remove(key)
    if live:
        raise RuntimeError(f"schedule never releases activations of {sorted(live)}")
    return peak


def inflight_microbatches(
    schedule: type | str,
    num_stages: int,
    n_microbatches: int,
    *,
    stages_per_rank: int = 1,
) -> list[int]:
    """Peak number of micro-batch activation sets each pipeline *rank* holds at once.

    ``schedule`` is a schedule class from ``torch.distributed.pipelining.schedules`` (or a
    subclass of one) or its name, case-insensitive, with or without the ``Schedule``
    prefix (``"gpipe"``, ``"1f1b"``, ``"interleaved1f1b"``, ``"loopedbfs"``,
    ``"interleavedzerobubble"``, ``"zbv"``, ``"dualpipev"``; see
    :func:`supported_schedules`). ``num_stages`` is the number of pipeline ranks and
    ``stages_per_rank`` the number of model chunks per rank (ZBV and DualPipeV need 2).

    The order is torch's own: multi-stage schedules are built around stand-in stages and
    their ``pipeline_order_with_comms`` is read; single-stage ones (GPipe, 1F1B) have
    their ``_step_microbatches`` executed with a recording stand-in stage.

    Counting, in units of one stage chunk's activations for one micro-batch: a chunk's
    activations become live at its forward (F) and are freed at its full backward (B).
    With split backward they stay live through the input-gradient step (I) and are freed
    at the weight-gradient step (W), because the weight gradient still reads the saved
    layer inputs. Returns each rank's peak, indexed by rank.

    Raises ValueError for unknown schedules, non-positive sizes, a stage count the
    schedule cannot take, or a micro-batch count torch rejects for that schedule.
    """
    orders = rank_actions(schedule, num_stages, n_microbatches, stages_per_rank=stages_per_rank)
    return [_peak_inflight(orders[rank]) for rank in range(num_stages)]


def stage_bits(
    inflight: Sequence[int],
    *,
    base_bits: int = 4,
    allowed: tuple[int, ...] = (4, 5, 6, 8, 16),
) -> list[int]:
    """Per-rank activation bit-widths that keep every rank at or under the busiest one.

    The most-loaded rank gets ``base_bits``; every other rank ``i`` gets the largest ``b``
    in ``allowed`` with ``inflight[i] * b <= max(inflight) * base_bits``. E.g. interleaved
    1F1B counts ``[11, 9, 7, 5]`` give ``[4, 4, 6, 8]``; 1F1B ``[4, 3, 2, 1]`` gives
    ``[4, 5, 8, 16]``.
    """
    counts = list(inflight)
    if not counts:
        raise ValueError("inflight must name at least one rank")
    for c in counts:
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise ValueError(f"inflight counts must be non-negative ints, got {counts!r}")
    peak = max(counts)
    if peak == 0:
        raise ValueError("inflight counts are all zero; no rank stores activations")
    if not allowed:
        raise ValueError("allowed must contain at least one bit-width")
    for b in allowed:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"allowed bit-widths must be positive ints, got {allowed!r}")
    # Requiring base_bits in allowed guarantees every rank has a feasible choice
    # (inflight[i] <= peak, so base_bits itself always fits the budget).
    if base_bits not in allowed or isinstance(base_bits, bool):
        raise ValueError(f"base_bits={base_bits!r} must be one of allowed={allowed!r}")
    budget = peak * base_bits
    return [max(b for b in allowed if c * b <= budget) for c in counts]


def quantize_stage(
    stage: Any,
    schedule: object,
    n_microbatches: int,
    plan: Any = None,
    *,
    stage_aware: bool = True,
    context: Any = None,
) -> Any:
    """Store a pipeline stage's activations as ``plan`` says, with this rank's stage bits.

    ``stage`` is a ``torch.distributed.pipelining.PipelineStage`` (its rank, the number of
    ranks and of chunks per rank are read from it) or a plain module (then ``stage_aware``
    must be False). Every forward of the stage's module runs inside
    :func:`agoq.quantize_activations` with ``plan.for_stage(...)`` (DBCA-PP: ranks holding
    fewer in-flight micro-batches get more bits). Backward needs nothing: unpack is
    idempotent, so split backward (zero-bubble I/W passes) works. Returns the activation
    context, whose ``report`` accumulates over the stage's forwards; pass it as ``context``
    for a rank's other stages (interleaved schedules) so one report covers the rank.
    """
    from .activations import ActivationPlan, quantize_activations

    plan = plan if plan is not None else ActivationPlan.agoq()
    module = getattr(stage, "submod", stage)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"quantize_stage expects a PipelineStage or a module, got {type(stage).__name__}"
        )
    if stage_aware:
        if not hasattr(stage, "group_rank"):
            raise TypeError(
                "stage-aware bits need a PipelineStage (for its rank); pass stage_aware=False"
            )
        ranks = stage.group_size
        plan = plan.for_stage(
            stage.group_rank,
            ranks,
            schedule,
            n_microbatches=n_microbatches,
            stages_per_rank=max(1, stage.num_stages // ranks),
        )
    ctx = context if context is not None else quantize_activations(plan)
    if ctx.plan != plan:
        raise ValueError("quantize_stage: the shared context was built for another plan")

    def enter(_module: torch.nn.Module, _args: Any) -> None:
        ctx.__enter__()

    def leave(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
        ctx.__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
    return ctx
