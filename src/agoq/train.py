"""One small training loop, shared by ``agoq demo`` and ``benchmarks/convergence.py``.

The reference LLaMA (:mod:`agoq.models.llama`) learns next-byte prediction on real text
(:mod:`agoq.data`) with AdamW, linear warmup then cosine decay and gradient clipping, in
the style of torchtitan's train loop. Options select how activations saved for backward
are stored (``plan``) and how gradients are averaged over ranks (``grads``).

Same seed, same everything: the initial weights and the order of the training batches
depend only on ``seed``. With ``world_size=2`` the two gloo ranks draw the same global batch
from the same seeded generator as a one-process run and each takes its half, so every
configuration sees the same data for a given seed.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._validate import ConfigTypeError, describe, expect_float, expect_int
from .activations import ActivationContext, ActivationPlan, quantize_activations
from .data import VOCAB_SIZE, sample, split, text_tokens
from .guard import NumericsGuard
from .models.llama import PRESETS, build
from .quant import QuantSpec

PLANS = ("none", "agoq", "agoq-norm32", "uniform4")
# The agoq plan with the residual stream (norm inputs) in fp4 blocks of 32, bf16 scales.
NORM32 = QuantSpec(bits=4, format="fp4_e2m1", block=32, scale_dtype=torch.bfloat16)
GRADS = ("fp32", "int8")
EVAL_SEED = 1234  # held-out windows are the same for every seed and configuration


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(msg: str, wrong_type: bool) -> ValueError:
    """``msg`` as a ValueError, or as a ConfigTypeError when the value's type is wrong."""
    return ConfigTypeError(msg) if wrong_type else ValueError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how.

    ``plan``: "none" (plain PyTorch), "agoq" (the paper's plan), "agoq-norm32" (the same
    with norm inputs in fp4 blocks of 32 with bf16 scales), "uniform4" (every saved
    activation in 4-bit fp4, attention internals included: the paper's ablation) or an
    :class:`ActivationPlan`. ``grads``: "fp32" (DDP's plain all-reduce) or "int8"
    (:func:`agoq.int8_allreduce`); only meaningful with ``world_size=2``. ``batch`` is the
    global batch (sequences per step over all ranks). The learning rate warms up linearly
    for ``warmup`` steps, then follows a cosine down to ``lr * min_lr_ratio``.
    """

    model: str = "small"
    steps: int = 300
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    plan: str | ActivationPlan = "none"
    grads: str = "fp32"
    world_size: int = 1
    eval_batches: int = 8
    timeout: float | None = None  # seconds for a world_size=2 run; None: sized from steps
    # agoq.NumericsGuard period in steps (activations; int8 gradients too); 0 = off
    numerics_check_every: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option (``ConfigTypeError``, which
        is also a ``TypeError``, for a value of the wrong type: no bools as ints, no strings
        as numbers)."""
        if not isinstance(self.model, str) or self.model not in PRESETS:
            raise _bad(
                f"unknown model preset {self.model!r}; choose from {sorted(PRESETS)}",
                not isinstance(self.model, str),
            )
        if isinstance(self.plan, str) and self.plan not in PLANS:
            raise ValueError(f"unknown activation plan {self.plan!r}; choose from {list(PLANS)}")
        if not isinstance(self.plan, (str, ActivationPlan)):
            raise ConfigTypeError(
                f"plan must be one of {list(PLANS)} or an ActivationPlan, got {describe(self.plan)}"
            )
        if not isinstance(self.grads, str) or self.grads not in GRADS:
            raise _bad(
                f"unknown gradient mode {self.grads!r}; choose from {list(GRADS)}",
                not isinstance(self.grads, str),
            )
        if not _is_int(self.world_size) or self.world_size not in (1, 2):
            raise _bad(
                f"world_size must be 1 or 2, got {self.world_size!r}", not _is_int(self.world_size)
            )
        if self.grads == "int8" and self.world_size == 1:
            raise ValueError("grads='int8' needs world_size=2 (one process has nothing to reduce)")
        for name in ("steps", "batch", "seq", "eval_batches"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _bad(f"{name} must be an integer >= 1, got {value!r}", not _is_int(value))
        if not _is_int(self.warmup) or self.warmup < 0:
            raise _bad(
                f"warmup must be an integer >= 0, got {self.warmup!r}", not _is_int(self.warmup)
            )
        expect_int(self.seed, "seed", low=-(2**63), high=2**64 - 1)
        if self.batch % self.world_size:
            raise ValueError(
                f"batch {self.batch} must be divisible by world_size {self.world_size}"
            )
        if self.seq > PRESETS[self.model].max_seq_len:
            raise ValueError(
                f"seq {self.seq} exceeds the model's max_seq_len {PRESETS[self.model].max_seq_len}"
            )
        if not _is_real(self.lr) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad(
                f"lr must be a positive finite number, got {self.lr!r}", not _is_real(self.lr)
            )
        if not _is_real(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise _bad(
                f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}",
                not _is_real(self.min_lr_ratio),
            )
        expect_float(self.weight_decay, "weight_decay", low=0.0)
        expect_float(self.grad_clip, "grad_clip", low=0.0, low_open=True)
        if self.timeout is not None:
            expect_float(self.timeout, "timeout", low=0.0, low_open=True)
        expect_int(self.numerics_check_every, "numerics_check_every", low=0)  # 0 = off
        if not isinstance(self.device, str):
            raise ConfigTypeError(f"device: expected a string, got {describe(self.device)}")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"invalid device {self.device!r}: {e}") from None
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {self.device!r}: agoq trains on cpu, cuda or mps")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {self.device!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {self.device!r} requested but MPS is not available")
        if dev.type != "cpu" and self.world_size > 1:
            raise ValueError("world_size=2 runs on CPU gloo ranks; use device='cpu'")

    def activation_plan(self) -> ActivationPlan | None:
        """The plan to store activations with, or None for plain PyTorch."""
        if isinstance(self.plan, ActivationPlan):
            return self.plan
        if self.plan == "agoq":
            return ActivationPlan.agoq()
        if self.plan == "agoq-norm32":
            return ActivationPlan.agoq(norm_spec=NORM32)
        if self.plan == "uniform4":
            return ActivationPlan.uniform(QuantSpec(bits=4, format="fp4_e2m1", block=128))
        return None


@dataclass
class TrainResult:
    """What a run measured. Bytes are per rank (``local_batch`` sequences per step).

    ``layers`` maps each layer (``layers.N``) and the remaining modules (``tok_embeddings``,
    ``norm``, ``output``, ``<no module>`` for the loss) to the exact bytes saved for backward
    in one step: ``original`` (what plain PyTorch holds) and ``stored`` (what is held under
    the plan; equal to ``original`` for plan "none"), counted by the activation context.
    ``unit_bytes`` is U = local_batch * seq * dim * 2, one bf16 hidden state.
    ``numerics``: the numerics guard's history (name -> [(step, relative error)]), empty
    when ``numerics_check_every`` is 0.
    """

    config: dict[str, Any]
    losses: list[float]
    eval_loss: float
    step_times: list[float]
    layers: dict[str, dict[str, int]]
    original_bytes: int
    stored_bytes: int
    peak_saved_bytes: int
    unit_bytes: int
    local_batch: int
    parameters: int
    wire_bytes_per_step: int | None = None
    cuda_max_allocated: int | None = None
    lrs: list[float] = field(default_factory=list)
    numerics: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)

    @property
    def median_step_s(self) -> float:
        """Median step time, first step excluded (it pays one-off costs) when possible."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times)

    def tail_loss(self, n: int = 20) -> float:
        """Mean training loss over the last ``n`` steps."""
        tail = self.losses[-n:]
        return sum(tail) / len(tail)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers, with the derived ones."""
        d = asdict(self)
        d["median_step_s"] = self.median_step_s
        d["final_train_loss"] = self.losses[-1]
        return d


# ----------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step`` (0-based): linear warmup, then cosine to the floor."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def _group(fqn: str) -> str:
    """``layers.3.attention.wq`` -> ``layers.3``; DDP's ``module.`` prefix dropped."""
    fqn = fqn.removeprefix("module.")
    parts = fqn.split(".")
    if parts[0] == "layers" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0] or "<root>"


def _layer_bytes(ctx: ActivationContext) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for fqn, row in ctx.report.by_fqn().items():
        g = out.setdefault(_group(fqn), {"original": 0, "stored": 0})
        g["original"] += row.original_bytes
        g["stored"] += row.stored_bytes
    return out


class _WireCounter:
    """State of the counting DDP hook: the inner hook's state and the bytes sent."""

    def __init__(self, grads: str, world: int, guard: NumericsGuard | None = None) -> None:
        from .gradients import Int8AllReduceState

        self.grads = grads
        self.world = world
        self.inner = Int8AllReduceState(guard=guard) if grads == "int8" else None
        self.bytes = 0


def _counting_hook(state, bucket):  # no annotations: DDP rejects string annotations
    """DDP comm hook that counts the bytes one rank sends, then reduces the bucket.

    int8: exactly :func:`agoq.gradients.wire_bytes` of the bucket (payload + scales, each
    parameter padded to whole blocks as the hook does). fp32: the ring all-reduce's
    2(W-1)/W x the bucket's bytes (a formula: gloo's traffic is not captured).
    """
    from .gradients import int8_allreduce, wire_bytes

    buf = bucket.buffer()
    if state.grads == "int8":
        base = buf.data_ptr()
        segments = [
            ((g.data_ptr() - base) // buf.element_size(), g.numel()) for g in bucket.gradients()
        ]
        state.bytes += wire_bytes(buf.numel(), state.world, state.inner.spec, segments)
        return int8_allreduce(state.inner, bucket)
    state.bytes += 2 * (state.world - 1) * buf.numel() * buf.element_size() // state.world
    buf.div_(state.world)
    dist.all_reduce(buf)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


# ------------------------------------------------------------------------------ loop


def _run(
    cfg: TrainConfig,
    rank: int,
    world: int,
    on_step: Callable[[int, float], None] | None,
) -> TrainResult:
    device = torch.device(cfg.device)
    train_ids, heldout_ids = split(text_tokens())

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        model = build(cfg.model, vocab_size=VOCAB_SIZE)
    model.reset_parameters(seed=cfg.seed)  # same seed => same init, whatever ran before
    model.to(device)
    net: torch.nn.Module = model
    counter = None
    every = cfg.numerics_check_every
    guard = NumericsGuard(every=every) if every else None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
        counter = _WireCounter(cfg.grads, world, guard)
        net.register_comm_hook(counter, _counting_hook)

    # torchtitan's AdamW defaults; the schedule is applied by hand each step.
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    plan = cfg.activation_plan()
    # Plain runs are measured once, at step 0, under a keep-everything context (which
    # changes no number); every other step runs without hooks, so its time is plain PyTorch.
    ctx = quantize_activations(plan if plan is not None else ActivationPlan.keep_all())
    gen = torch.Generator().manual_seed(cfg.seed)
    local = cfg.batch // world
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses: list[float] = []
    times: list[float] = []
    lrs: list[float] = []
    layers: dict[str, dict[str, int]] = {}
    peak = 0
    wire = None
    for step in range(cfg.steps):
        tokens = sample(train_ids, cfg.batch, cfg.seq, gen)[rank * local : (rank + 1) * local]
        tokens = tokens.to(device)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        measure = plan is not None or step == 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with ctx if measure else nullcontext():
            loss = next_token_loss(net, tokens)
        loss.backward()
        if guard is not None and plan is not None:  # on the inner module, not DDP's wrapper
            guard.check_activations(step, ctx, model, partial(next_token_loss, model, tokens))
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)

        value = loss.detach().float()
        if world > 1:  # log the global batch's loss, as a one-process run does
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        lrs.append(lr)
        if measure:
            if step == 0:
                layers = _layer_bytes(ctx)
            peak = max(peak, ctx.report.peak_bytes)
            ctx.report.clear()
        if counter is not None:
            wire, counter.bytes = counter.bytes, 0  # the last step's (after DDP's rebuild)
        if on_step is not None:
            on_step(step, losses[-1])

    eval_loss = evaluate(model, heldout_ids, cfg) if rank == 0 else math.nan
    dim = PRESETS[cfg.model].dim
    cfg_dict = asdict(cfg)
    if isinstance(cfg.plan, ActivationPlan):
        cfg_dict["plan"] = "custom"
    return TrainResult(
        config=cfg_dict,
        losses=losses,
        eval_loss=eval_loss,
        step_times=times,
        layers=layers,
        original_bytes=sum(v["original"] for v in layers.values()),
        stored_bytes=sum(v["stored"] for v in layers.values()),
        peak_saved_bytes=peak,
        unit_bytes=local * cfg.seq * dim * 2,
        local_batch=local,
        parameters=sum(p.numel() for p in model.parameters()),
        wire_bytes_per_step=wire,
        cuda_max_allocated=(
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        lrs=lrs,
        numerics=guard.history if guard is not None else {},
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, heldout: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean next-byte loss on ``cfg.eval_batches`` fixed held-out batches (nats/byte)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(EVAL_SEED)
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(cfg.eval_batches):
        total += next_token_loss(model, sample(heldout, cfg.batch, cfg.seq, gen).to(device)).item()
    model.train(was_training)
    return total / cfg.eval_batches


def _rank_main(rank: int, world: int, cfg: TrainConfig, queue: Any) -> TrainResult | None:
    def report(step: int, loss: float) -> None:
        queue.put((step, loss))

    result = _run(cfg, rank, world, report if (queue is not None and rank == 0) else None)
    return result if rank == 0 else None


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``cfg`` and return what was measured.

    ``on_step(step, loss)`` is called after every step (from a helper thread when
    ``world_size=2``, whose ranks run in spawned processes).
    """
    cfg.validate()
    if cfg.world_size == 1:
        return _run(cfg, 0, 1, on_step)

    from .spawn import context, run_ranks

    queue = context().Queue() if on_step is not None else None
    stop = threading.Event()

    def drain() -> None:  # forward the ranks' progress to on_step
        import queue as queue_mod

        while not stop.is_set() or not queue.empty():
            try:
                step, loss = queue.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            on_step(step, loss)

    thread = threading.Thread(target=drain, daemon=True) if queue is not None else None
    if thread is not None:
        thread.start()
    timeout = cfg.timeout if cfg.timeout is not None else 300.0 + 10.0 * cfg.steps
    try:
        results = run_ranks(_rank_main, cfg.world_size, cfg, queue, timeout=timeout)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
    return results[0]
