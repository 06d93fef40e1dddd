"""The ``[agoq]`` section of a torchtitan 0.2.2 job config.

torchtitan merges this module's :class:`JobConfig` into its own when started with
``--job.custom_config_module torchtitan_ext.config`` (or ``[job] custom_config_module =
"torchtitan_ext.config"`` in the TOML); the ``[agoq]`` table and ``--agoq.<key>`` flags then
fill :class:`Agoq`. Every value is checked when the config is parsed, before any model is
built; an unknown key in the ``[agoq]`` table is refused by torchtitan's TOML loader with a
message that names the key and lists the valid ones; an unknown ``--agoq.<key>`` flag is
refused by tyro. This module does not import torchtitan (checking the activation plan
imports agoq, and so torch).
"""

# No ``from __future__ import annotations``: torchtitan merges these dataclasses into its
# own with ``make_dataclass``, and tyro then needs the field types as real objects.
from dataclasses import dataclass, field, fields
from typing import Any

ACTIVATION_PRESETS = ("agoq", "uniform", "keep", "off")
ACTIVATION_FORMATS = ("", "int", "fp4_e2m1", "fp8_e4m3")


class _SectionType(type):
    """Names the section readably in torchtitan's "Invalid field names in {cls}" error."""

    def __repr__(cls) -> str:
        names = ", ".join(f.name for f in fields(cls))  # type: ignore[arg-type]
        return f"the [agoq] section (valid keys: {names})"


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"[agoq] {key}: {msg}")


def _check_int(key: str, value: Any, *, low: int, allowed: tuple[int, ...] = ()) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(key, f"expected an integer, got {value!r}")
    if allowed and value not in allowed:
        _fail(key, f"must be one of {list(allowed)}, got {value}")
    if value < low:
        _fail(key, f"must be >= {low}, got {value}")


@dataclass
class Agoq(metaclass=_SectionType):
    """agoq's settings for a torchtitan run (active with ``[model] converters = ["agoq"]``)."""

    activations: str = "agoq"
    """Activation plan preset: "agoq" (the paper's plan: residual-stream, attention-output
    and SwiGLU inputs at `activation_bits`, GEMM inputs recomputed, attention internals
    kept), "uniform" (every kind at `activation_bits`, attention included), "keep" (store
    everything untouched; the report still measures) or "off" (no activation context)."""

    activation_bits: int = 4
    """Base width of the preset's quantized kinds (4 = fp4 E2M1 by default; 2, 3, 5, 6, 8 = int)."""

    activation_format: str = ""
    """"" = fp4_e2m1 at 4 bits, int otherwise; or "int", "fp4_e2m1", "fp8_e4m3"."""

    activation_block: int = 128
    """Elements per scale in quantized activations."""

    activation_kinds: dict[str, int | str] = field(default_factory=dict)
    """Per-kind override: kind -> bits, "keep" or "recompute" (e.g. {attn_internals = 8})."""

    activation_min_numel: int = 4096
    """Saved tensors with fewer elements are kept as they are."""

    recompute: bool = True
    """Rebuild "recompute" kinds (norm outputs, the SwiGLU product) in backward."""

    stage_aware: bool = True
    """With pipeline parallelism: per-rank activation bits from the schedule (DBCA-PP)."""

    grad_bits: int = 8
    """8: int8 gradient collectives (DDP all-reduce hook / FSDP2 reduce-scatter); 0: off."""

    grad_block: int = 0
    """Elements per scale on the gradient wire; 0 = agoq's default (DDP 128, FSDP2 256)."""

    error_feedback: bool = False
    """DDP only: carry each parameter's quantization error into the next step."""

    grad_storage: bool = False
    """Hold gradients in 8 bits between micro-batches (gradient accumulation / PP)."""

    report: bool = True
    """Log agoq's activation memory report and gradient-hook counters."""

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATION_PRESETS:
            _fail(
                "activations",
                f"must be one of {list(ACTIVATION_PRESETS)}, got {self.activations!r}",
            )
        _check_int("activation_bits", self.activation_bits, low=2, allowed=(2, 3, 4, 5, 6, 8))
        if self.activation_format not in ACTIVATION_FORMATS:
            _fail(
                "activation_format",
                f"must be one of {list(ACTIVATION_FORMATS)}, got {self.activation_format!r}",
            )
        _check_int("activation_block", self.activation_block, low=1)
        _check_int("activation_min_numel", self.activation_min_numel, low=0)
        if not isinstance(self.activation_kinds, dict):
            _fail("activation_kinds", f"must be a table, got {self.activation_kinds!r}")
        for key in ("recompute", "stage_aware", "error_feedback", "grad_storage", "report"):
            if not isinstance(getattr(self, key), bool):
                _fail(key, f"must be true or false, got {getattr(self, key)!r}")
        _check_int("grad_bits", self.grad_bits, low=0, allowed=(0, 8))
        _check_int("grad_block", self.grad_block, low=0)
        b = self.grad_block
        if b and (b < 16 or b > 4096 or b & (b - 1)):
            _fail(
                "grad_block", f"must be 0 (agoq's default) or a power of two in [16, 4096], got {b}"
            )
        if self.activations != "off":
            try:
                self.activation_plan()
            except ValueError as e:
                raise ValueError(f"[agoq] activation plan: {e}") from None

    def plan_table(self) -> dict[str, Any]:
        """The activation plan as the table ``agoq.ActivationPlan.from_dict`` reads."""
        table: dict[str, Any] = {
            "preset": self.activations,
            "bits": self.activation_bits,
            "block": self.activation_block,
            "min_numel": self.activation_min_numel,
            "recompute": self.recompute,
            "kinds": dict(self.activation_kinds),
        }
        if self.activation_format:
            table["format"] = self.activation_format
        return table

    def activation_plan(self):
        """The ``agoq.ActivationPlan`` (None when ``activations = "off"``)."""
        if self.activations == "off":
            return None
        from agoq import ActivationPlan

        return ActivationPlan.from_dict(self.plan_table())


@dataclass
class JobConfig:
    """Merged into torchtitan's JobConfig by ``--job.custom_config_module``."""

    agoq: Agoq = field(default_factory=Agoq)
