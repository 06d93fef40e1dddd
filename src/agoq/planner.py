"""Memory planner: predicted per-GPU memory of LLaMA training with and without agoq.

Two levels, both closed-form (nothing is allocated):

* :func:`layer_units` — the paper's Table 1: activation bytes stored per transformer layer,
  in units of ``U = micro-batch x sequence x hidden x 2 bytes`` (one bf16 hidden state),
  split into the table's seven columns, for the baseline, a COAT-like FP8 scheme and agoq.
* :func:`predict` — per-GPU memory for a model and a TP/PP/DP layout, split into weights,
  gradients, optimizer states, activations and a fixed runtime overhead, for each
  combination of agoq's parts the paper ablates (A = activations, G = 8-bit gradients,
  O = an 8-bit optimizer).

The baseline is what the paper measures against: Megatron-LM mixed precision (bf16 weights,
fp32 main gradients, fp32 master weights and Adam moments). What that baseline stores per
layer is set by :class:`Accounting`, whose defaults are the paper's: RMSNorm inputs kept in
fp32, an unfused SwiGLU that saves gate, silu(gate) and up, and 5U of attention internals
(Megatron's legacy model repeats K/V to every head before flash-attention). Every default
is a field, so a user with another framework (fused SwiGLU, bf16 norms, native GQA) can
say so. docs/planner.md checks the predictions against the paper's measured Tables 8 and 14.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch.distributed.pipelining import schedules as _tsched

from ._validate import ConfigTypeError, describe
from .gradients.allreduce import DEFAULT_SPEC as GRAD_SPEC
from .pipeline import _peak_inflight, _resolve_schedule, rank_actions, stage_bits
from .quant import QuantSpec

__all__ = [
    "COLUMNS",
    "MODELS",
    "METHODS",
    "SETUPS",
    "Accounting",
    "Layout",
    "MemoryPrediction",
    "ModelShape",
    "Pipeline",
    "Setup",
    "layer_units",
    "predict",
    "with_accounting",
]

COLUMNS = ("QKV", "Attention", "Linear", "RMSNorm", "FFN1", "Act func", "FFN2")
METHODS = ("baseline", "coat", "agoq")
GIB = 2**30


# Sizes above 2**53 lose integer precision in the float byte counts: refused as absurd.
MAX_SIZE = 2**53
MAX_SCHEDULE_WORK = 2**15


def _check_size(where: str, value: Any, *, low_msg: str = "a positive int") -> None:
    """A positive int (bools refused) no larger than :data:`MAX_SIZE`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{where} must be a positive int, got {describe(value)}")
    if value < 1:
        if low_msg == "a positive int":
            raise ValueError(f"{where} must be a positive int, got {value!r}")
        raise ValueError(f"{where} must be {low_msg}, got {value!r}")
    if value > MAX_SIZE:
        raise ValueError(f"{where} must be <= 2**53, got {describe(value)}")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-style decoder that decide its memory."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab"):
            _check_size(f"ModelShape.{key}", getattr(self, key))
        if not isinstance(self.name, str):
            raise ConfigTypeError(f"ModelShape.name: expected a string, got {describe(self.name)}")
        if not isinstance(self.tied_embeddings, bool):
            raise ConfigTypeError(
                f"ModelShape.tied_embeddings: expected true or false, "
                f"got {describe(self.tied_embeddings)}"
            )
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"ModelShape: hidden={self.hidden} must be divisible by heads={self.heads}, "
                f"and heads by kv_heads={self.kv_heads}"
            )

    @property
    def ffn_ratio(self) -> float:
        """MLP width over hidden size (LLaMA: about 8/3; the paper's Table 1 assumes 4)."""
        return self.ffn / self.hidden

    @property
    def kv_ratio(self) -> float:
        """K/V heads over query heads (1 without grouped-query attention)."""
        return self.kv_heads / self.heads

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer (projections, MLP and its two norms)."""
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return 2 * h * h + 2 * h * kv + 3 * h * self.ffn + 2 * h

    def layer_params_per_rank(self, tp: int) -> float:
        """One layer's parameters on each of ``tp`` tensor-parallel ranks. K/V projections
        are replicated when there are fewer K/V heads than ranks (one head per rank)."""
        if self.heads % tp or (self.kv_heads % tp and tp % self.kv_heads):
            raise ValueError(
                f"tp={tp} must divide heads={self.heads}, and divide or be a multiple of "
                f"kv_heads={self.kv_heads}"
            )
        kv = 2 * self.hidden * (self.hidden // self.heads) * self.kv_heads
        kv_per_rank = kv / tp if self.kv_heads % tp == 0 else kv / self.kv_heads
        return (self.layer_params - kv) / tp + kv_per_rank

    @property
    def embedding_params(self) -> int:
        """Parameters of the token embedding (the LM head has as many unless tied)."""
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters."""
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden

    @classmethod
    def from_json(cls, text_or_path: str) -> ModelShape:
        """A shape from a JSON object (inline or a file): our field names, or a Hugging Face
        ``config.json`` (hidden_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings)."""
        inline = text_or_path.lstrip().startswith("{")
        name = "custom"
        if inline:
            text = text_or_path
        else:
            path = Path(text_or_path)
            if not path.is_file():
                raise ValueError(
                    f"unknown model {text_or_path!r}: not a preset ({', '.join(MODELS)}), "
                    "an inline JSON object or a JSON file"
                )
            text, name = path.read_text(), path.stem
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model JSON is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("model JSON must be an object")
        hf = {
            "hidden_size": "hidden",
            "num_hidden_layers": "layers",
            "num_attention_heads": "heads",
            "num_key_value_heads": "kv_heads",
            "intermediate_size": "ffn",
            "vocab_size": "vocab",
            "tie_word_embeddings": "tied_embeddings",
        }
        fields_ = {"name", "hidden", "layers", "heads", "kv_heads", "ffn", "vocab"}
        fields_.add("tied_embeddings")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in hf:
                out[hf[key]] = value
            elif key in fields_:
                out[key] = value
        out.setdefault("name", raw.get("_name_or_path", name))
        if "heads" in out:
            out.setdefault("kv_heads", out["heads"])
        missing = {"hidden", "layers", "heads", "ffn", "vocab"} - out.keys()
        if missing:
            raise ValueError(f"model JSON lacks {sorted(missing)}")
        return cls(**out)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama3-8b", 4096, 32, 32, 8, 14336, 128256),
        ModelShape("llama2-13b", 5120, 40, 40, 40, 13824, 32000),
        ModelShape("codellama-34b", 8192, 48, 64, 8, 22016, 32016),
        ModelShape("llama3-70b", 8192, 80, 64, 8, 28672, 128256),
        # The abstract layer of the paper's Table 1: MLP 4x wide, no grouped-query attention.
        ModelShape("paper-table-1", 4096, 32, 32, 32, 16384, 32000),
    )
}


@dataclass(frozen=True)
class Accounting:
    """What the baseline framework stores, and the costs outside the layers.

    Defaults follow the paper's baseline (Megatron-LM, legacy model, flash-attention).
    """

    norm_bits: int = 32  # Megatron keeps RMSNorm inputs in fp32 (Table 1's footnote)
    swiglu_saves: float = 3.0  # unfused silu(gate) * up saves gate, silu(gate) and up
    expand_kv: bool = True  # legacy Megatron repeats K/V to every head before attention
    # Q, K, V and the output are 4U; the paper (after COAT) counts 5U for attention.
    attention_extra: float = 1.0
    # Vocab-parallel cross-entropy: the bf16 logits plus their fp32 softmax kept for backward.
    logits_bytes: float = 6.0
    # CUDA context, cuBLAS/NCCL workspaces and allocator slack: outside any tensor count.
    overhead_gib: float = 1.0
    # An 8-bit optimizer (bitsandbytes Adam8bit): fp32 master weights, two 1-byte moments,
    # one fp32 absmax per 2048-element block of each moment.
    adam8_bytes: float = 4 + 2 * (1 + 4 / 2048)
    # With 8-bit gradient storage the optimizer still reads full-precision gradients: the
    # step materialises them in fp32 (the paper's release does the same) while activations
    # are already freed.
    step_grad_bytes: float = 4.0

    def __post_init__(self) -> None:
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            if key == "expand_kv":
                if not isinstance(value, bool):
                    raise ValueError(f"Accounting.expand_kv must be true or false, got {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"Accounting.{key} must be a finite number >= 0, got {value!r}")
        if self.norm_bits <= 0:
            raise ValueError(f"Accounting.norm_bits must be > 0, got {self.norm_bits!r}")

    def attention_units(self, shape: ModelShape) -> float:
        """U of attention internals per layer (kept in bf16 by every method)."""
        kv = 1.0 if self.expand_kv else shape.kv_ratio
        return 2 + 2 * kv + self.attention_extra


def layer_units(
    shape: ModelShape,
    method: str = "agoq",
    bits: float = 4,
    accounting: Accounting | None = None,
) -> dict[str, float]:
    """Activation storage of one transformer layer in U, per column of the paper's Table 1.

    ``method`` is ``"baseline"`` (bf16, norms as ``accounting.norm_bits``), ``"coat"``
    (FP8 norm/MLP activations, the rest bf16) or ``"agoq"`` (the paper's plan: attention
    kept, norm inputs / attention out-projection input / SwiGLU input at ``bits`` per
    element, the GEMM inputs recomputed). ``bits`` may include scale overhead (e.g. 4.25);
    16 means the stage keeps those tensors in bf16 (recomputation still applies).
    With the paper's abstract layer and default accounting this is exactly Table 1:
    28U, 16.5U and 7.75U.
    """
    acc = accounting or Accounting()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if not (0 < bits <= 32):
        raise ValueError(f"bits must be in (0, 32], got {bits!r}")
    r, attn = shape.ffn_ratio, acc.attention_units(shape)
    if method == "baseline":
        row = (1, attn, 1, 2 * acc.norm_bits / 16, 1, acc.swiglu_saves * r, r)
    elif method == "coat":
        half = 8 / 16
        row = (1, attn, 1, 2 * half, half, acc.swiglu_saves * r * half, r * half)
    else:
        q = bits / 16
        # bits >= 16: the stage keeps those tensors as the framework stores them.
        norm = 2 * acc.norm_bits / 16 if bits >= 16 else 2 * q
        row = (0, attn, q, norm, 0, 2 * r * q, 0)
    return dict(zip(COLUMNS, (float(v) for v in row), strict=True))


@dataclass(frozen=True)
class Layout:
    """Parallel layout and batch of one training step."""

    seq: int
    mbs: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    n_microbatches: int | None = None  # per data-parallel rank; default 2 * pp
    stages_per_rank: int | None = None  # default 2 for multi-stage schedules, else 1
    sequence_parallel: bool | None = None  # default: on whenever tp > 1
    zero1: bool = False  # optimizer states sharded over dp (Megatron's distributed optimizer)

    def __post_init__(self) -> None:
        for key in ("seq", "mbs", "tp", "pp", "dp"):
            _check_size(f"Layout.{key}", getattr(self, key))
        if self.n_microbatches is not None:
            _check_size("Layout.n_microbatches", self.n_microbatches, low_msg=">= 1")
        if self.stages_per_rank is not None:
            _check_size("Layout.stages_per_rank", self.stages_per_rank, low_msg=">= 1")
        if not isinstance(self.schedule, (str, type)):
            raise ConfigTypeError(
                f"Layout.schedule: expected a string, got {describe(self.schedule)}"
            )
        for key in ("sequence_parallel", "zero1"):
            value = getattr(self, key)
            if not isinstance(value, bool) and not (key == "sequence_parallel" and value is None):
                raise ConfigTypeError(
                    f"Layout.{key}: expected true or false, got {describe(value)}"
                )
        _resolve_schedule(self.schedule)  # a typo is an error even without pipelining
        if self.pp > 1:
            # The planner runs torch's schedule to count in-flight micro-batches; its cost
            # grows faster than stages x micro-batches, so absurd sizes are refused.
            n_mb = self.n_microbatches or 2 * self.pp
            work = self.pp * (self.stages_per_rank or 2) * n_mb
            if work > MAX_SCHEDULE_WORK:
                raise ValueError(
                    f"Layout: pp={self.pp} x chunks x {n_mb} micro-batches is too large to "
                    f"simulate (at most {MAX_SCHEDULE_WORK} stage x micro-batch pairs)"
                )

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank (1 without pipeline parallelism)."""
        if self.pp == 1:
            return 1
        if self.stages_per_rank is not None:
            return self.stages_per_rank
        multi = issubclass(_resolve_schedule(self.schedule), _tsched.PipelineScheduleMulti)
        return 2 if multi else 1

    @property
    def sp(self) -> bool:
        """Whether norm/residual activations are split over TP ranks."""
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def inflight(self) -> list[int]:
        """Peak micro-batch activation sets (of one chunk) each pipeline rank holds."""
        return self.pipeline().inflight

    def pipeline(self) -> Pipeline:
        """Which stages each rank runs and how many micro-batches it holds at its peak, read
        from the schedule torch would run."""
        if self.pp == 1:
            # Gradient accumulation holds one micro-batch at a time.
            return Pipeline(stages=[[0]], inflight=[1], last_stage_inflight=1)
        n_mb = self.n_microbatches or 2 * self.pp
        orders = rank_actions(self.schedule, self.pp, n_mb, stages_per_rank=self.chunks)
        last = self.pp * self.chunks - 1
        last_rank = next(
            r for r, acts in orders.items() if any(a.stage_index == last for a in acts)
        )
        return Pipeline(
            stages=[sorted({a.stage_index for a in orders[r]}) for r in range(self.pp)],
            inflight=[_peak_inflight(orders[r]) for r in range(self.pp)],
            last_stage_inflight=_peak_inflight(
                a for a in orders[last_rank] if a.stage_index == last
            ),
        )


@dataclass(frozen=True)
class Pipeline:
    """Stage placement and peak in-flight micro-batches, per pipeline rank."""

    stages: list[list[int]]  # stage indices each rank runs (torch's placement)
    inflight: list[int]  # peak (stage, micro-batch) activation sets held, per rank
    last_stage_inflight: int  # micro-batches the loss stage holds at once (their logits)


@dataclass(frozen=True)
class Setup:
    """Which of agoq's parts are on (the paper's ablation letters)."""

    name: str
    activations: bool = False  # A: the agoq activation plan (with DBCA stage bits)
    grads8: bool = False  # G: 8-bit gradient storage (and all-reduce)
    optim8: bool = False  # O: an 8-bit optimizer (torchao / bitsandbytes, not agoq)


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in (
        Setup("baseline"),
        Setup("O", optim8=True),
        Setup("O+G", grads8=True, optim8=True),
        Setup("A+G", activations=True, grads8=True),
        Setup("A+O+G", activations=True, grads8=True, optim8=True),
    )
}


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted bytes on the busiest GPU for one setup, and where they go."""

    setup: str
    rank: int  # the pipeline rank with the highest peak
    weights: float
    grads: float
    optimizer: float
    activations: float  # layers' saved tensors + logits, at the forward/backward peak
    overhead: float
    step_extra: float  # optimizer-step transient (full-precision gradients from 8-bit)
    bits: tuple[float, ...] = field(default=())  # activation bits per pipeline rank

    @property
    def total(self) -> float:
        """Peak bytes: the larger of the forward/backward peak and the optimizer step."""
        static = self.weights + self.grads + self.optimizer + self.overhead
        return static + max(self.activations, self.step_extra)

    @property
    def phase(self) -> str:
        """Which phase sets the peak."""
        return "optimizer step" if self.step_extra > self.activations else "forward/backward"


def _stage_layers(layers: int, n_stages: int) -> list[int]:
    # Layers spread as evenly as the pipeline allows; leftover layers go to the first stages.
    base, extra = divmod(layers, n_stages)
    return [base + (1 if c < extra else 0) for c in range(n_stages)]


def predict(
    shape: ModelShape,
    layout: Layout,
    setup: Setup | str = "A+O+G",
    *,
    activation_spec: QuantSpec | None = None,
    stage_aware: bool = True,
    accounting: Accounting | None = None,
) -> MemoryPrediction:
    """Predict the peak per-GPU memory of one training step on the busiest pipeline rank.

    ``activation_spec`` is the 4-bit format of the agoq plan (default: the plan's fp4 E2M1,
    block 128, fp32 scales, i.e. 4.25 bits per element); with ``stage_aware`` ranks that
    hold fewer micro-batches get more bits (DBCA, :func:`agoq.pipeline.stage_bits`).
    """
    acc = accounting or Accounting()
    if isinstance(setup, str):
        if setup not in SETUPS:
            raise ValueError(f"unknown setup {setup!r}; choose from {list(SETUPS)}")
        setup = SETUPS[setup]
    if shape.layers < layout.pp * layout.chunks:
        raise ValueError(
            f"{shape.layers} layers cannot fill {layout.pp} pipeline ranks x {layout.chunks} chunks"
        )
    spec = activation_spec or QuantSpec(bits=4, format="fp4_e2m1", block=128)
    overhead = spec.bits_per_element - spec.bits
    pipe = layout.pipeline()
    inflight = pipe.inflight
    if setup.activations and stage_aware and layout.pp > 1:
        allowed = tuple(sorted({spec.bits} | {b for b in (4, 5, 6, 8, 16) if b > spec.bits}))
        rank_bits = stage_bits(inflight, base_bits=spec.bits, allowed=allowed)
    else:
        rank_bits = [spec.bits] * layout.pp
    eff_bits = [16.0 if b >= 16 else b + overhead for b in rank_bits]

    tp, u_bytes = layout.tp, layout.mbs * layout.seq * shape.hidden * 2
    # Without sequence parallelism the norm inputs and the GEMM inputs that follow a norm
    # are replicated on every TP rank; everything else is split.
    replicated = set() if layout.sp else {"QKV", "RMSNorm", "FFN1"}
    split = tp if layout.sp else 1
    grad_bytes = GRAD_SPEC.bits_per_element / 8 if setup.grads8 else 4.0
    opt_bytes = acc.adam8_bytes if setup.optim8 else 12.0
    if layout.zero1:
        opt_bytes /= layout.dp
    layer_params = shape.layer_params_per_rank(tp)
    per_stage = _stage_layers(shape.layers, layout.pp * layout.chunks)
    last_stage = len(per_stage) - 1

    best: MemoryPrediction | None = None
    for rank, stages in enumerate(pipe.stages):
        first, last = 0 in stages, last_stage in stages
        n_layers = sum(per_stage[i] for i in stages)
        params = n_layers * layer_params
        if first:
            params += shape.embedding_params / tp
        if last:
            # Tied embeddings still need the head's copy when the head is on another rank.
            head = not shape.tied_embeddings or not first
            params += shape.hidden + (shape.embedding_params / tp if head else 0)
        method = "agoq" if setup.activations else "baseline"
        units = layer_units(shape, method, eff_bits[rank], acc)
        per_layer = sum(u / (1 if col in replicated else tp) for col, u in units.items())
        # In-flight counts are of stage chunks; a chunk holds the rank's mean layers per stage.
        acts = per_layer * u_bytes * n_layers / len(stages) * inflight[rank]
        if last:
            # Per micro-batch the loss stage holds: the final norm input and the LM-head
            # input (recomputed under agoq), then the logits of the cross-entropy.
            kept = not setup.activations or eff_bits[rank] >= 16
            norm_u = acc.norm_bits / 16 if kept else eff_bits[rank] / 16
            head_u = 0.0 if setup.activations else 1.0
            per_mb = (norm_u + head_u) * u_bytes / split
            per_mb += layout.mbs * layout.seq * shape.vocab / tp * acc.logits_bytes
            acts += per_mb * pipe.last_stage_inflight
        pred = MemoryPrediction(
            setup=setup.name,
            rank=rank,
            weights=2.0 * params,
            grads=grad_bytes * params,
            optimizer=opt_bytes * params,
            activations=acts,
            overhead=acc.overhead_gib * GIB,
            step_extra=acc.step_grad_bytes * params if setup.grads8 else 0.0,
            bits=tuple(float(b) for b in rank_bits) if setup.activations else (),
        )
        if best is None or pred.total > best.total:
            best = pred
    assert best is not None
    if not math.isfinite(best.total + best.step_extra):
        raise ValueError(
            "the prediction overflows (not a finite number of bytes): the model, layout or "
            "accounting values are too large"
        )
    return best


def with_accounting(acc: Accounting | None, overrides: Mapping[str, Any]) -> Accounting:
    """``acc`` (default :class:`Accounting`) with fields replaced; unknown names raise."""
    base = acc or Accounting()
    unknown = set(overrides) - set(Accounting.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown accounting field(s) {sorted(unknown)}")
    return replace(base, **overrides)
