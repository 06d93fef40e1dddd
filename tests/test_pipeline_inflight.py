"""In-flight activation counts of torch pipeline schedules, and DBCA-PP bit-widths.

Expected figures come from hand reasoning about the schedules (GPipe, 1F1B, Megatron's
interleaved warm-up), not from agoq's code. The "from torch" tests make sure the counts
follow torch's schedules: a subclass with a different order must change the result, and
torch's own runtime loop, executed with recording stand-in stages, must run exactly the
order that was counted.
"""

from __future__ import annotations

import pytest
import torch.distributed.pipelining.schedules as ts
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping

from agoq import pipeline
from agoq.pipeline import inflight_microbatches, rank_actions, stage_bits, supported_schedules

MULTI = [
    ("loopedbfs", 2),
    ("interleaved1f1b", 2),
    ("interleavedzerobubble", 2),
    ("zbv", 2),
    ("dualpipev", 2),
]


# --- hand-derived figures -------------------------------------------------------------


@pytest.mark.parametrize("p,m", [(1, 1), (2, 3), (4, 8), (4, 2), (6, 5)])
def test_gpipe_every_rank_holds_all_microbatches(p: int, m: int) -> None:
    assert inflight_microbatches("gpipe", p, m) == [m] * p


@pytest.mark.parametrize("p,m", [(1, 1), (2, 2), (4, 4), (4, 8), (5, 13), (8, 16)])
def test_1f1b_rank_r_holds_p_minus_r(p: int, m: int) -> None:
    assert inflight_microbatches("1f1b", p, m) == [p - r for r in range(p)]


def test_interleaved_1f1b_paper_configuration() -> None:
    assert inflight_microbatches("interleaved1f1b", 4, 8, stages_per_rank=2) == [11, 9, 7, 5]


@pytest.mark.parametrize("p,m,v", [(4, 8, 2), (4, 16, 2), (8, 16, 2), (2, 8, 4), (4, 12, 3)])
def test_interleaved_1f1b_matches_megatron_warmup_when_m_divisible_by_p(
    p: int, m: int, v: int
) -> None:
    # Megatron: num_warmup = (p - rank - 1) * 2 + (v - 1) * p, capped at m * v, plus the
    # first steady-state forward.
    megatron = [min(m * v, (p - r - 1) * 2 + (v - 1) * p + 1) for r in range(p)]
    assert inflight_microbatches("interleaved1f1b", p, m, stages_per_rank=v) == megatron


def test_looped_bfs_holds_every_chunk_of_every_microbatch() -> None:
    assert inflight_microbatches("loopedbfs", 4, 8, stages_per_rank=2) == [16] * 4


# --- zero-bubble schedules ------------------------------------------------------------


def _peak_releasing_at(actions: list, release: set) -> int:
    """Independent counter: live from F until the first action whose type is in release."""
    live: set = set()
    peak = 0
    for a in actions:
        key = (a.stage_index, a.microbatch_index)
        if a.computation_type == ts.FORWARD:
            live.add(key)
            peak = max(peak, len(live))
        elif a.computation_type in release:
            live.discard(key)
    return peak


@pytest.mark.parametrize("name,v", [("interleavedzerobubble", 1), ("interleavedzerobubble", 2)])
@pytest.mark.parametrize("p,m", [(4, 8), (2, 6)])
def test_split_backward_holds_activations_until_weight_grad(
    name: str, v: int, p: int, m: int
) -> None:
    counts = inflight_microbatches(name, p, m, stages_per_rank=v)
    orders = rank_actions(name, p, m, stages_per_rank=v)
    at_w = [_peak_releasing_at(orders[r], {ts.FULL_BACKWARD, ts.BACKWARD_WEIGHT}) for r in range(p)]
    at_i = [_peak_releasing_at(orders[r], {ts.FULL_BACKWARD, ts.BACKWARD_INPUT}) for r in range(p)]
    assert counts == at_w
    assert all(w >= i for w, i in zip(at_w, at_i, strict=True))
    # Deferred W must actually cost memory somewhere, or this test would not tell the rules apart.
    assert at_w != at_i


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12)])
def test_zero_bubble_holds_at_least_1f1b(p: int, m: int) -> None:
    ref = inflight_microbatches("1f1b", p, m)
    zb1p = inflight_microbatches("interleavedzerobubble", p, m)
    assert all(z >= o for z, o in zip(zb1p, ref, strict=True))
    # ZB-V (Qi et al., 2024, sec. 6) keeps 1F1B's peak, p full-stage micro-batches, which is
    # 2p half-size chunks, and spreads it evenly over the ranks.
    assert inflight_microbatches("zbv", p, m, stages_per_rank=2) == [2 * max(ref)] * p


# --- the counts come from torch -------------------------------------------------------


class _BFSOrderInterleaved(ts.ScheduleInterleaved1F1B):
    """Interleaved1F1B class whose per-rank order is LoopedBFS's (all F, then all B)."""

    def _calculate_single_rank_operations(self, rank):
        return ts.ScheduleLoopedBFS._calculate_single_rank_operations(self, rank)


class _GPipeOrder1F1B(ts.Schedule1F1B):
    """1F1B class that executes GPipe's fill-drain loop."""

    _step_microbatches = ts.ScheduleGPipe._step_microbatches


def test_multi_stage_count_follows_the_classes_pipeline_order() -> None:
    stock = inflight_microbatches(ts.ScheduleInterleaved1F1B, 4, 8, stages_per_rank=2)
    assert stock == [11, 9, 7, 5]
    assert inflight_microbatches(_BFSOrderInterleaved, 4, 8, stages_per_rank=2) == [16] * 4


def test_single_stage_count_follows_the_classes_step_microbatches() -> None:
    assert inflight_microbatches(ts.Schedule1F1B, 4, 8) == [4, 3, 2, 1]
    assert inflight_microbatches(_GPipeOrder1F1B, 4, 8) == [8] * 4


class _Recorder:
    """Stage stand-in for torch's runtime loops: records compute, does no communication."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int, rank: int) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, rank
        self.submod = None
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.log: list = []

    def get_fwd_recv_ops(self, *a, **k) -> list:
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def forward_one_chunk(self, mb: int, *a, **k) -> None:
        self.log.append(ts._Action(self.stage_index, ts.FORWARD, mb))

    def backward_one_chunk(self, mb: int, *a, full_backward: bool = True, **k) -> None:
        kind = ts.FULL_BACKWARD if full_backward else ts.BACKWARD_INPUT
        self.log.append(ts._Action(self.stage_index, kind, mb))

    def backward_weight_one_chunk(self, mb: int, *a, **k) -> None:
        self.log.append(ts._Action(self.stage_index, ts.BACKWARD_WEIGHT, mb))

    def set_local_fwd_input(self, *a, **k) -> None:
        pass

    set_local_bwd_input = perform_reduce_grad = set_local_fwd_input

    def get_local_bwd_output(self, *a, **k) -> None:
        return None


def _torch_runtime_trace(name: str, p: int, m: int, v: int, rank: int) -> list:
    """Run torch's own _step_microbatches for one rank and return its shared action log."""
    cls = pipeline._resolve_schedule(name)
    log: list = []
    if issubclass(cls, ts.PipelineScheduleSingle):
        stages = [_Recorder(rank, p, p, rank)]
        sched = cls(stages[0], m)
        sched._initialize_stage = lambda *a, **k: None
    else:
        style = "v" if name in ("zbv", "dualpipev") else "loop"
        stage_ids = generate_rank_to_stage_mapping(p, p * v, style=style)[rank]
        stages = [_Recorder(i, p * v, p, rank) for i in stage_ids]
        sched = cls(stages, m)
        sched._initialize_stages = lambda *a, **k: None
    for s in stages:
        s.log = log
    sched._step_microbatches()
    return log


@pytest.mark.parametrize(
    "name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved1f1b", 3), *MULTI], ids=str
)
def test_counted_order_is_what_torchs_runtime_executes(name: str, v: int) -> None:
    p, m = 4, 8
    orders = rank_actions(name, p, m, stages_per_rank=v)
    counts = inflight_microbatches(name, p, m, stages_per_rank=v)
    release = {ts.FULL_BACKWARD, ts.BACKWARD_WEIGHT}
    for rank in range(p):
        executed = _torch_runtime_trace(name, p, m, v, rank)
        assert executed == orders[rank]
        assert _peak_releasing_at(executed, release) == counts[rank]


@pytest.mark.parametrize("cls", [ts.ScheduleGPipe, ts.Schedule1F1B])
@pytest.mark.parametrize("p,m", [(1, 1), (3, 3), (4, 8), (5, 7)])
def test_single_stage_fallback_simulation_matches_trace(cls: type, p: int, m: int) -> None:
    for rank in range(p):
        traced = pipeline._trace_single(cls, rank, p, m)
        assert pipeline._simulate_single(cls, rank, p, m) == traced


def test_fallback_is_used_with_a_warning_when_tracing_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> list:
        raise AttributeError("stage API changed")

    monkeypatch.setattr(pipeline, "_trace_single", broken)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert inflight_microbatches("1f1b", 4, 8) == [4, 3, 2, 1]


# --- counting rule on hand-written orders ---------------------------------------------


def _acts(spec: str) -> list:
    return [ts._Action.from_str(s) for s in spec.split()]


@pytest.mark.parametrize(
    "spec,peak",
    [
        ("0F0 0F1 0B0 0F2 0B1 0B2", 2),
        ("0F0 0F1 0I0 0F2 0W0 0I1 0I2 0W1 0W2", 3),
        ("0F0 0I0 0W0 0F1 0I1 0W1", 1),
        ("0F0 1F0 1B0 0B0", 2),
    ],
)
def test_peak_counting_rule(spec: str, peak: int) -> None:
    assert pipeline._peak_inflight(_acts(spec)) == peak


def test_overlapped_forward_backward_counts_forward_first() -> None:
    overlap = ts._Action(-1, ts.OVERLAP_F_B, None, tuple(_acts("0F1 0B0")))
    assert pipeline._peak_inflight([*_acts("0F0"), overlap, *_acts("0B1")]) == 2


@pytest.mark.parametrize("spec", ["0F0 0F0 0B0", "0B0", "0F0 0I0", "0F0 0W1"])
def test_inconsistent_orders_are_rejected(spec: str) -> None:
    with pytest.raises(RuntimeError):
        pipeline._peak_inflight(_acts(spec))


# --- schedule names and argument validation -------------------------------------------


@pytest.mark.parametrize(
    "alias,cls",
    [
        ("1F1B", ts.Schedule1F1B),
        ("schedule_1f1b", ts.Schedule1F1B),
        ("GPipe", ts.ScheduleGPipe),
        ("Interleaved-1F1B", ts.ScheduleInterleaved1F1B),
        ("ZBV", ts.ScheduleZBVZeroBubble),
        ("zbvzerobubble", ts.ScheduleZBVZeroBubble),
        ("looped_bfs", ts.ScheduleLoopedBFS),
        ("DualPipeV", ts.ScheduleDualPipeV),
    ],
)
def test_names_resolve_to_torch_classes(alias: str, cls: type) -> None:
    assert pipeline._resolve_schedule(alias) is cls


def test_supported_schedules_are_torch_classes() -> None:
    names = supported_schedules()
    assert "Schedule1F1B" in names and "ScheduleInterleaved1F1B" in names
    assert all(isinstance(getattr(ts, n), type) for n in names)


@pytest.mark.parametrize(
    "schedule",
    ["pipedream", "", "dualpipe", ts.PipelineScheduleMulti, ts.PipelineScheduleSingle, int, 3],
)
def test_unknown_schedule_raises_with_the_supported_list(schedule: object) -> None:
    with pytest.raises(ValueError, match="Schedule1F1B"):
        inflight_microbatches(schedule, 4, 8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_stages": 0},
        {"num_stages": -2},
        {"num_stages": True},
        {"num_stages": 4.0},
        {"n_microbatches": 0},
        {"stages_per_rank": 0},
    ],
)
def test_bad_sizes_raise(kwargs: dict) -> None:
    args = {"num_stages": 4, "n_microbatches": 8} | kwargs
    spr = args.pop("stages_per_rank", 2)
    with pytest.raises(ValueError, match="positive int"):
        inflight_microbatches("interleaved1f1b", stages_per_rank=spr, **args)


@pytest.mark.parametrize("name", ["zbv", "dualpipev"])
@pytest.mark.parametrize("v", [1, 3])
def test_v_schedules_need_two_stages_per_rank(name: str, v: int) -> None:
    with pytest.raises(ValueError, match="exactly 2 stages per rank"):
        inflight_microbatches(name, 4, 8, stages_per_rank=v)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_single_stage_schedules_reject_virtual_stages(name: str) -> None:
    with pytest.raises(ValueError, match="one stage per rank"):
        inflight_microbatches(name, 4, 8, stages_per_rank=2)


@pytest.mark.parametrize(
    "name,p,m,v", [("1f1b", 4, 3, 1), ("dualpipev", 4, 7, 2), ("interleaved1f1b", 4, 9, 2)]
)
def test_microbatch_counts_torch_rejects_raise_value_error(
    name: str, p: int, m: int, v: int
) -> None:
    with pytest.raises(ValueError):
        inflight_microbatches(name, p, m, stages_per_rank=v)


# --- stage_bits -------------------------------------------------------------------------


def test_stage_bits_paper_figures() -> None:
    assert stage_bits([11, 9, 7, 5]) == [4, 4, 6, 8]
    assert stage_bits([4, 3, 2, 1]) == [4, 5, 8, 16]
    assert stage_bits([8, 8, 8, 8]) == [4, 4, 4, 4]
    assert stage_bits([2, 1], base_bits=8, allowed=(8, 16)) == [8, 16]


def test_stage_bits_from_real_schedule() -> None:
    counts = inflight_microbatches("interleaved1f1b", 4, 8, stages_per_rank=2)
    assert stage_bits(counts) == [4, 4, 6, 8]


@settings(max_examples=200, deadline=None)
@given(
    inflight=st.lists(st.integers(0, 64), min_size=1, max_size=16).filter(lambda x: max(x) > 0),
    allowed=st.sets(st.integers(1, 32), min_size=1, max_size=6),
    data=st.data(),
)
def test_stage_bits_never_exceeds_the_busiest_rank(
    inflight: list[int], allowed: set[int], data: st.DataObject
) -> None:
    allowed_t = tuple(sorted(allowed))
    base = data.draw(st.sampled_from(allowed_t))
    bits = stage_bits(inflight, base_bits=base, allowed=allowed_t)
    budget = max(inflight) * base
    assert len(bits) == len(inflight)
    for c, b in zip(inflight, bits, strict=True):
        assert b in allowed_t
        assert c * b <= budget
        # b is the largest feasible choice.
        assert all(c * x > budget for x in allowed_t if x > b)
    assert bits[inflight.index(max(inflight))] == base


@pytest.mark.parametrize(
    "inflight,kwargs,match",
    [
        ([], {}, "at least one rank"),
        ([3, -1], {}, "non-negative"),
        ([3, 1.5], {}, "non-negative"),
        ([True, 2], {}, "non-negative"),
        ([0, 0], {}, "all zero"),
        ([4, 2], {"allowed": ()}, "at least one bit-width"),
        ([4, 2], {"allowed": (4, 0)}, "positive ints"),
        ([4, 2], {"allowed": (4, 8.0)}, "positive ints"),
        ([4, 2], {"base_bits": 3}, "must be one of allowed"),
        ([4, 2], {"base_bits": True, "allowed": (1, 4)}, "must be one of allowed"),
    ],
)
def test_stage_bits_bad_inputs(inflight: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stage_bits(inflight, **kwargs)
