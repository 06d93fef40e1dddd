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
import os
from dataclasses import dataclass, field, fields
from typing import Any

ACTIVATION_PRESETS = ("agoq", "uniform", "keep", "off")
ACTIVATION_FORMATS = ("", "int", "fp4_e2m1", "fp8_e4m3")


class _SectionType(type):
    """Names the section readably in torchtitan's "Invalid field names in {cls}" error."""

    def __repr__(cls) -> str:
        names = ", ".join(f.name for f in fields(cls))  # type: ignore[arg-type]
        return f"the [agoq] section (valid keys: {names})"


NUMERICS_ACTIONS = ("fallback", "warn", "raise")
_BOOL_KEYS = ("recompute", "stage_aware", "error_feedback", "grad_storage", "report")


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

    numerics_check_every: int = 0
    """Numerics guard: every N steps measure agoq's error on the live run; 0 = off."""

    numerics_threshold: float = 0.05
    """Relative error (vs the unquantized result) above which the guard acts."""

    numerics_activation_threshold: float = 0.5
    """Relative one-step gradient error of the activation check above which the guard acts
    (4-bit activations legitimately give ~0.1; see docs/numerics-guard.md)."""

    numerics_action: str = "fallback"
    """Above the threshold: "fallback" (that kind/bucket to full precision, with a
    warning), "warn" or "raise"."""

    def __post_init__(self) -> None:
        # agoq's one typed validation path; imported here so that importing this module
        # (which torchtitan does early) does not import torch.
        from agoq._validate import (
            expect_bool,
            expect_float,
            expect_int,
            expect_str,
            expect_table,
        )

        def at(key: str) -> str:
            return f"[agoq] {key}"

        expect_str(self.activations, at("activations"), choices=ACTIVATION_PRESETS)
        expect_int(self.activation_bits, at("activation_bits"), allowed=(2, 3, 4, 5, 6, 8))
        expect_str(self.activation_format, at("activation_format"), choices=ACTIVATION_FORMATS)
        expect_int(self.activation_block, at("activation_block"), low=1)
        expect_int(self.activation_min_numel, at("activation_min_numel"), low=0)
        expect_table(self.activation_kinds, at("activation_kinds"))
        for key in _BOOL_KEYS:
            expect_bool(getattr(self, key), at(key))
        expect_int(self.grad_bits, at("grad_bits"), allowed=(0, 8))
        b = expect_int(self.grad_block, at("grad_block"), low=0)
        if b and (b < 16 or b > 4096 or b & (b - 1)):
            raise ValueError(
                f"[agoq] grad_block: must be 0 (agoq's default) or a power of two in "
                f"[16, 4096], got {b}"
            )
        expect_int(self.numerics_check_every, at("numerics_check_every"), low=0)
        self.numerics_threshold = expect_float(
            self.numerics_threshold, at("numerics_threshold"), low=0.0, low_open=True
        )
        self.numerics_activation_threshold = expect_float(
            self.numerics_activation_threshold,
            at("numerics_activation_threshold"),
            low=0.0,
            low_open=True,
        )
        expect_str(self.numerics_action, at("numerics_action"), choices=NUMERICS_ACTIONS)
        if self.activations != "off":
            try:
                self.activation_plan()
            except ValueError as e:  # ConfigTypeError (also a TypeError) keeps its type
                raise type(e)(f"[agoq] activation plan: {e}") from None

    @classmethod
    def from_toml(cls, path: "str | os.PathLike[str]") -> "Agoq":
        """The settings of the ``[agoq]`` table of a TOML file (a torchtitan 0.2.2 job TOML,
        or a file with only that table); other tables are ignored. An unknown key is
        refused with the list of valid ones; a file without the table is an error."""
        import tomllib

        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"[agoq] {path}: not valid TOML ({e})") from None
        table = data.get("agoq")
        if not isinstance(table, dict):
            raise ValueError(f"[agoq] {path}: no [agoq] table")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - valid)
        if unknown:
            raise ValueError(
                f"[agoq] {path}: unknown key(s) {', '.join(unknown)} in the [agoq] table "
                f"(valid keys: {', '.join(f.name for f in fields(cls))})"
            )
        return cls(**table)

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
