"""Rank functions of the gradient reliability tests (module level: spawned ranks import them).

Gradients are set exactly: a :class:`Probe` model's loss is ``sum(w_i * c_i)``, so the
gradient of ``w_i`` is ``c_i``, chosen per rank and step. References are plain fp32 math on
the gradients of every rank (DDP's default: divide by the world size, then sum).
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

N = 1024  # elements per probe parameter (8 blocks of 128)


class Probe(nn.Module):
    """Parameters whose gradients are exactly the coefficients passed to forward."""

    def __init__(self, names: tuple[str, ...] = ("a", "b"), n: int = N, dtype=torch.float32):
        super().__init__()
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.zeros(n, dtype=dtype)))

    def forward(self, coeffs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, k) * c).sum() for k, c in coeffs.items())


def coeff(rank: int, step: int, name: str, n: int = N, scale: float = 1.0) -> torch.Tensor:
    """The gradient rank ``rank`` produces for parameter ``name`` at ``step``."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{rank}/{step}/{name}".encode()))
    return torch.randn(n, generator=g) * scale


def fp32_mean(parts: list[torch.Tensor]) -> torch.Tensor:
    world = len(parts)
    out = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        out += p.float() / world
    return out


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _error(fn) -> str:
    """The exception ``fn()`` raised, as 'Type: message' ('' when it did not raise)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return ""


def make_state(model: nn.Module | None = None, **kw) -> Any:
    """An Int8AllReduceState bound to ``model`` (when this agoq can bind: the tests also
    run against the pre-issue code, where they must fail on the symptom, not on the API)."""
    from agoq.gradients import Int8AllReduceState

    st = Int8AllReduceState(**kw)
    if model is not None and hasattr(st, "bind"):
        st.bind(model)
    return st


def _ddp(model: nn.Module, state: Any, **kw) -> DDP:
    from agoq.gradients import int8_allreduce

    ddp = DDP(model, bucket_cap_mb=0.001, **kw)  # ~1 KB: one bucket per probe parameter
    if state is not None:
        ddp.register_comm_hook(state, int8_allreduce)
    return ddp


def _step(ddp: DDP, coeffs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ddp.zero_grad(set_to_none=True)
    ddp(coeffs).backward()
    return {n: p.grad.detach().clone() for n, p in ddp.module.named_parameters()}


# --------------------------------------------------------------------------- numerics


def numerics_rank(rank: int, world: int) -> dict:
    """Non-finite steps under error feedback, values near the fp32 maximum, float64."""
    from agoq.gradients import Int8AllReduceState, Int8ReduceScatter, int8_all_reduce
    from agoq.gradients.fsdp import int8_all_reduce_hook

    out: dict[str, Any] = {}

    # 1. Error feedback through one GradScaler-style overflow (Inf in "a" on rank 0, step 1).
    model = Probe()
    state = make_state(model, error_feedback=True)
    ddp = _ddp(model, state)
    steps = []
    for step in range(6):
        cs = {k: coeff(rank, step, k) for k in ("a", "b")}
        if step == 1 and rank == 0:
            cs["a"][300] = math.inf
        got = _step(ddp, cs)
        ref = {k: fp32_mean([coeff(r, step, k) for r in range(world)]) for k in ("a", "b")}
        steps.append(
            {
                "a_finite": bool(torch.isfinite(got["a"]).all()),
                "b_finite": bool(torch.isfinite(got["b"]).all()),
                "a_rel": rel(got["a"], ref["a"]) if step != 1 else math.nan,
                "b_rel": rel(got["b"], ref["b"]),
                "a_blocks_bad": (~torch.isfinite(got["a"].view(-1, 128)).all(1))
                .nonzero()
                .flatten()
                .tolist(),
            }
        )
    out["ef_steps"] = steps
    out["ef_residual_finite"] = all(bool(torch.isfinite(r).all()) for r in state.residuals.values())

    # 2. Gradients near the fp32 maximum: DDP's default stays finite, so must agoq.
    big = torch.full((N,), 3.0e38) * (1 - 0.01 * torch.arange(N) / N)
    near = {}
    near["int8_all_reduce"] = int8_all_reduce(big.clone(), dist.group.WORLD)
    for name, st in (("default", None), ("agoq", Int8AllReduceState())):
        near[f"ddp_{name}"] = _step(_ddp(Probe(("a",)), st), {"a": big.clone()})["a"]
    comm = Int8ReduceScatter()
    o = torch.empty(N)
    comm(o, torch.cat([big] * world), dist.group.WORLD, dist.ReduceOp.AVG)
    near["reduce_scatter"] = o
    hooked = big.clone()
    int8_all_reduce_hook(dist.group.WORLD)(hooked)
    near["fsdp_hook"] = hooked
    out["near_max"] = {k: (bool(torch.isfinite(v).all()), rel(v, big)) for k, v in near.items()}

    # 3. float64 is refused on every gradient path (TypeError naming float64).
    f64 = torch.randn(N, dtype=torch.float64)
    errs = {"int8_all_reduce": _error(lambda: int8_all_reduce(f64.clone(), dist.group.WORLD))}
    m64 = _ddp(Probe(("a",), dtype=torch.float64), Int8AllReduceState())
    errs["ddp_hook"] = _error(lambda: m64({"a": f64}).backward())
    errs["reduce_scatter"] = _error(
        lambda: Int8ReduceScatter()(
            torch.empty(N, dtype=torch.float64),
            torch.cat([f64] * world),
            dist.group.WORLD,
            dist.ReduceOp.AVG,
        )
    )
    errs["fsdp_hook"] = _error(lambda: int8_all_reduce_hook(dist.group.WORLD)(f64.clone()))
    out["float64"] = errs
    dist.barrier()
    return out


# ----------------------------------------------------------------------------- config


class WqWo(nn.Module):
    """Two same-shape parameters; ``order`` is their registration order (a refactor
    between a save and a resume may change it, the FQNs stay)."""

    def __init__(self, order: tuple[str, str] = ("wq", "wo")) -> None:
        super().__init__()
        for name in order:
            self.register_parameter(name, nn.Parameter(torch.zeros(N)))

    def forward(self, coeffs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, k) * c).sum() for k, c in coeffs.items())


def _wqwo_coeffs(rank: int, step: int) -> dict[str, torch.Tensor]:
    # Different magnitudes: a swapped residual is visibly wrong.
    return {"wq": coeff(rank, step, "wq", scale=10.0), "wo": coeff(rank, step, "wo", scale=0.1)}


def config_rank(rank: int, world: int) -> dict:
    """FQN-keyed residuals across a registration-order change; DDP's private flag missing."""
    from agoq.gradients import Int8GradStore

    out: dict[str, Any] = {}

    # FQN-keyed residuals: train 3 steps with wq registered before wo, save, resume into a
    # model that registers wo first; one more step must equal the uninterrupted run.
    def build(order):
        model = WqWo(order)
        st = make_state(model, error_feedback=True)
        return _ddp(model, st), st

    ddp_a, st_a = build(("wq", "wo"))
    for step in range(3):
        _step(ddp_a, _wqwo_coeffs(rank, step))
    sd = copy.deepcopy(st_a.state_dict())  # its tensors are the live residuals
    cont = _step(ddp_a, _wqwo_coeffs(rank, 3))
    ddp_b, st_b = build(("wo", "wq"))
    st_b.load_state_dict(sd)
    resumed = _step(ddp_b, _wqwo_coeffs(rank, 3))
    out["fqn"] = {k: torch.equal(cont[k], resumed[k]) for k in cont}

    # Int8GradStore on a DDP module whose private flag is gone (a future torch).
    ddp = _ddp(Probe(), None)
    del ddp.require_forward_param_sync
    out["ddp_flag"] = _error(lambda: Int8GradStore(ddp))
    dist.barrier()
    return out


def mismatch_rank(rank: int, world: int) -> dict:
    """Settings that differ between ranks (on the pre-issue code they crash or hang gloo)."""
    from agoq.gradients import Int8AllReduceState, Int8ReduceScatter
    from agoq.gradients.fsdp import int8_all_reduce_hook

    out: dict[str, Any] = {}
    base = dict(block=128, scale_dtype=torch.bfloat16, rounding="nearest", min_numel=0)
    variants = {
        "block": {"block": 256},
        "scale_dtype": {"scale_dtype": torch.float32},
        "rounding": {"rounding": "stochastic"},
        "min_numel": {"min_numel": 10 * N},  # rank 1 would take the full-precision path
        "error_feedback": {"error_feedback": True},
    }
    try:
        from agoq.guard import NumericsGuard

        variants["guard"] = {"guard": NumericsGuard(every=1)}
    except ImportError:  # the pre-issue code has no guard
        pass
    mism = {}
    for field, change in variants.items():
        kw = dict(base, **(change if rank == 1 else {}))
        model = Probe()
        ddp = _ddp(model, make_state(model, **kw))
        t0 = time.monotonic()
        msg = _error(lambda d=ddp: d({k: coeff(rank, 0, k) for k in ("a", "b")}).backward())
        mism[field] = (msg, time.monotonic() - t0)
    comm = Int8ReduceScatter(block=256 if rank == 1 else 128)
    mism["reduce_scatter_block"] = (
        _error(
            lambda: comm(
                torch.empty(N), torch.randn(world * N), dist.group.WORLD, dist.ReduceOp.AVG
            )
        ),
        0.0,
    )
    hook = int8_all_reduce_hook(dist.group.WORLD, min_numel=(10 * N if rank == 1 else 0))
    mism["fsdp_hook_min_numel"] = (_error(lambda: hook(torch.randn(N))), 0.0)
    # After all those refusals the group still works, and equal settings pass the check.
    ok_state = Int8AllReduceState(**base)
    same = _error(
        lambda: _step(_ddp(Probe(), ok_state), {k: coeff(rank, 0, k) for k in ("a", "b")})
    )
    mism["same_settings"] = (same, 0.0)
    out["mismatch"] = mism

    dist.barrier()
    return out


# ------------------------------------------------------------------------------ guard


def _guard_coeffs(rank: int, step: int) -> dict[str, torch.Tensor]:
    """'bad': per block one huge outlier that cancels across ranks (+1e4 / -1e4) on top of
    small values that int8 rounds away; 'good': plain Gaussian gradients."""
    small = coeff(rank, step, "bad")
    bad = small.clone()
    bad[::128] = 1e4 if rank == 0 else -1e4
    return {"bad": bad, "good": coeff(rank, step, "good")}


def guard_rank(rank: int, world: int) -> dict:
    from agoq.gradients import Int8AllReduceState
    from agoq.guard import NumericsError, NumericsGuard

    out: dict[str, Any] = {}
    guard = NumericsGuard(every=1, threshold=0.05, action="fallback")
    model = Probe(("good", "bad"))
    state = Int8AllReduceState(guard=guard, model=model)
    ddp = _ddp(model, state)
    grads = []
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            grads.append(_step(ddp, _guard_coeffs(rank, step)))
    last = grads[-1]
    parts = [_guard_coeffs(r, 3) for r in range(world)]
    ref = {k: fp32_mean([p[k] for p in parts]) for k in ("bad", "good")}
    out["history"] = {k: [e for _, e in v] for k, v in guard.history.items()}
    out["fallbacks"] = sorted(guard.fallbacks)
    out["bad_exact"] = torch.equal(last["bad"], ref["bad"])
    out["good_rel"] = rel(last["good"], ref["good"])
    out["good_exact"] = torch.equal(last["good"], ref["good"])
    out["warnings"] = [str(w.message) for w in caught]

    # action="raise": NumericsError on every rank.
    model = Probe(("good", "bad"))
    st = Int8AllReduceState(guard=NumericsGuard(every=1, action="raise"), model=model)
    ddp = _ddp(model, st)
    errs = []
    for step in range(3):
        try:
            _step(ddp, _guard_coeffs(rank, step))
        except NumericsError as e:
            errs.append((step, str(e)))
            break
    out["raised"] = errs
    dist.barrier()
    return out


# ------------------------------------------------------------------------------ DCP


def _mlp() -> nn.Module:
    # wq/wo-like same-shape layers: a residual or store entry put on the wrong one shows.
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32)
    )


def _dcp_batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(f"dcp/{rank}/{step}/{micro}".encode()))
    return torch.randn(8, 16, generator=g), torch.randn(8, 32, generator=g)


class _Run:
    """DDP + int8 hook with error feedback + Int8GradStore for 2 no_sync micro-batches
    + AdamW: one training setup, built from scratch (``seed`` sets the initial weights)."""

    def __init__(self, rank: int, seed: int) -> None:
        from agoq.gradients import Int8GradStore, int8_allreduce

        torch.manual_seed(seed)
        self.rank = rank
        self.ddp = DDP(_mlp(), bucket_cap_mb=0.001)
        self.state = make_state(self.ddp, error_feedback=True)
        self.ddp.register_comm_hook(self.state, int8_allreduce)
        self.opt = torch.optim.AdamW(self.ddp.parameters(), lr=1e-2)
        self.store = Int8GradStore(self.ddp)

    def micro(self, step: int, micro: int) -> None:
        x, y = _dcp_batch(self.rank, step, micro)
        if micro < 2:
            with self.ddp.no_sync():  # DDP decides at forward time: forward inside it
                torch.nn.functional.mse_loss(self.ddp(x), y).backward()
            self.store.accumulate()
        else:
            self.store.materialize()
            # DDP reduces here, through the int8 hook.
            torch.nn.functional.mse_loss(self.ddp(x), y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def run(self, start: tuple[int, int], stop: int) -> None:
        for step in range(start[0], stop):
            for micro in range(start[1] if step == start[0] else 0, 3):
                self.micro(step, micro)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.ddp, self.opt)
        return {
            "model": model,
            "optim": optim,
            "hook": self.state.state_dict(),
            "store": self.store.state_dict(),
        }

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = self.state_dict()  # a template: same keys and shapes as what was saved
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(
            self.ddp, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )
        self.state.load_state_dict(sd["hook"])
        self.store.load_state_dict(sd["store"])

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.ddp.parameters()]


def dcp_rank(rank: int, world: int, path: str) -> dict:
    """Train K=3 steps and one micro-batch of step 3 (the store then holds it), save
    through DCP, finish 3 more steps; then build everything anew (other initial weights),
    load, finish the same steps: the parameters must be bitwise equal."""
    import torch.distributed.checkpoint as dcp

    a = _Run(rank, seed=0)
    a.run((0, 0), 3)
    a.micro(3, 0)
    held = len(a.store)
    residual_norm = sum(float(r.norm()) for r in a.state.residuals.values())
    dcp.save(a.state_dict(), checkpoint_id=path)
    a.run((3, 1), 6)
    b = _Run(rank, seed=1)
    differs_before = not all(torch.equal(x, y) for x, y in zip(a.params(), b.params(), strict=True))
    b.load(path)
    b.run((3, 1), 6)
    equal = [torch.equal(x, y) for x, y in zip(a.params(), b.params(), strict=True)]
    dist.barrier()
    return {
        "equal": equal,
        "held": held,
        "residual_norm": residual_norm,
        "differs_before": differs_before,
        "params": a.params(),
    }


def dead_rank(rank: int, world: int, victim: int, path: str) -> str:
    """``victim`` SIGKILLs itself inside the comm hook during step 1; the survivors must
    raise, and write how long it took."""
    from agoq.gradients import Int8AllReduceState, int8_allreduce

    steps = [0]

    def hook(state, bucket):
        if bucket.index() == 0:
            steps[0] += 1
            if rank == victim and steps[0] == 2:  # step 1, before its first collective
                os.kill(os.getpid(), signal.SIGKILL)
        return int8_allreduce(state, bucket)

    ddp = DDP(Probe(), bucket_cap_mb=0.001)
    ddp.register_comm_hook(Int8AllReduceState(), hook)
    t0 = time.monotonic()
    try:
        for step in range(3):
            _step(ddp, {k: coeff(rank, step, k) for k in ("a", "b")})
        outcome = "completed"
    except Exception as e:  # noqa: BLE001 - recorded for the test
        outcome = f"raised after {time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}"
    with open(os.path.join(path, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    if outcome == "completed":
        return outcome
    raise RuntimeError(outcome)


__all__ = ["dcp_rank", "config_rank", "mismatch_rank", "dead_rank", "guard_rank", "numerics_rank"]
