"""ActivationPlan: which format each kind of saved activation is stored in.

A *kind* names the role of a tensor saved for backward (``norm_input``,
``attn_internals``, ...). Kinds are resolved from the module that saves the tensor, by FQN
pattern and module class; the defaults recognise agoq's reference LLaMA, torchtitan's llama3
(0.2.x and 0.3.x names) and HuggingFace Llama. Each kind maps to a :class:`QuantSpec`,
``"keep"`` (stored untouched) or ``"recompute"`` (not stored: rebuilt in backward from other
stored tensors, the paper's "Case 1"; if it cannot be rebuilt, stored with ``fallback``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._validate import (
    ConfigTypeError,
    describe,
    expect_bool,
    expect_int,
    expect_list,
    expect_regex,
    expect_str,
    expect_str_list,
    expect_table,
    read_toml,
)
from ..quant import QuantSpec

Action = QuantSpec | Literal["keep", "recompute"]

KINDS: dict[str, str] = {
    "norm_input": "input of an RMSNorm/LayerNorm (the residual stream)",
    "attn_proj_input": "input of the Q/K/V projections (the attention norm's output)",
    "qk_norm_input": "input of a per-head q/k norm inside attention (Qwen3, Gemma3)",
    "attn_internals": "what attention saves: rotated q/k, v, its output, logsumexp",
    "attn_probs": "attention probabilities of an explicit softmax (eager attention)",
    "attn_out_input": "input of the attention output projection",
    "mlp_up_input": "input of the MLP gate/up projections (the MLP norm's output)",
    "swiglu_input": "what the MLP activation saves: gate/up outputs and their products",
    "mlp_down_input": "input of the MLP down projection (the SwiGLU product)",
    "embedding_output": "output of the token embedding",
    "lm_head_input": "input of the LM head (the final norm's output)",
    "other": "anything else saved while the context is active (e.g. the loss's logits)",
}


@dataclass(frozen=True)
class KindRule:
    """Assigns ``kind`` to modules whose FQN matches ``pattern`` (``re.search``) or whose
    class name is in ``classes``. Producer rules (``producer=True``) instead tag a module's
    *output*: a saved tensor produced by that module gets the kind wherever it is saved."""

    kind: str
    pattern: str = ""
    classes: tuple[str, ...] = ()
    producer: bool = False

    def __post_init__(self) -> None:
        # Typed: a bare string for classes would match by substring, "false" be truthy.
        expect_str(self.kind, "KindRule.kind", choices=KINDS)
        expect_regex(self.pattern, "KindRule.pattern")
        object.__setattr__(self, "classes", expect_str_list(self.classes, "KindRule.classes"))
        expect_bool(self.producer, "KindRule.producer")
        if not self.pattern and not self.classes:
            raise ValueError("KindRule needs a pattern or classes")

    def matches(self, fqn: str, module: nn.Module) -> bool:
        """True when this rule applies to ``module`` named ``fqn``."""
        if self.classes and type(module).__name__ in self.classes:
            return True
        return bool(self.pattern) and re.search(self.pattern, fqn) is not None


_SEG = r"(?:^|\.)"
DEFAULT_RULES: tuple[KindRule, ...] = (
    KindRule("embedding_output", _SEG + r"(tok_embeddings|embed_tokens|wte)$", producer=True),
    # A decoder layer's output is the residual stream (what HF gradient checkpointing saves).
    KindRule("norm_input", _SEG + r"(layers|h|blocks)\.\d+$", producer=True),
    KindRule(
        "qk_norm_input", _SEG + r"(q_norm|k_norm|q_layernorm|k_layernorm|query_norm|key_norm)$"
    ),
    KindRule(
        "norm_input",
        _SEG + r"(\w*norm|ln_f|ln_\d+)$",
        classes=("RMSNorm", "LayerNorm", "LlamaRMSNorm"),
    ),
    KindRule(
        "attn_proj_input",
        _SEG
        + r"(attention\.(wq|wk|wv|wqkv|qkv_linear\.wqkv|qkv_linear)"
        + r"|self_attn\.(q_proj|k_proj|v_proj|qkv_proj))$",
    ),
    KindRule("attn_out_input", _SEG + r"(attention\.wo|self_attn\.o_proj)$"),
    KindRule("attn_internals", _SEG + r"(attention|self_attn|inner_attention|sdpa)$"),
    KindRule(
        "mlp_up_input",
        _SEG + r"(feed_forward\.(w1|w3|w13)|mlp\.(gate_proj|up_proj|gate_up_proj))$",
    ),
    KindRule("mlp_down_input", _SEG + r"(feed_forward\.w2|mlp\.down_proj)$"),
    KindRule("swiglu_input", _SEG + r"(feed_forward|mlp)$"),
    KindRule("lm_head_input", _SEG + r"(output|lm_head)$"),
)

_PLAN_KEYS = (
    "preset",
    "bits",
    "format",
    "block",
    "scale_dtype",
    "kinds",
    "rules",
    "min_numel",
    "recompute",
    "fallback",
    "compiled",
)


_SPEC_KEYS = ("bits", "format", "block", "rounding", "scale_dtype")


def _spec(base: QuantSpec, where: str, **kw: Any) -> QuantSpec:
    """``base`` with fields replaced; QuantSpec's refusal is reported under ``where``."""
    try:
        return dataclasses.replace(base, **kw)
    except ValueError as e:  # ConfigTypeError included: keep its type
        raise type(e)(f"{where}: {e}") from None


def _action(value: Any, base: QuantSpec, where: str) -> Action:
    """Parse a plan value: "keep", "recompute", 16 (= keep), a bit width, or a spec table."""
    if isinstance(value, QuantSpec):
        return value
    expected = "a bit width, 'keep', 'recompute' or a spec table"
    if isinstance(value, str):
        if value in ("keep", "recompute"):
            return value  # type: ignore[return-value]
        raise ValueError(f"{where}: expected {expected}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, Mapping)):
        raise ConfigTypeError(f"{where}: expected {expected}, got {describe(value)}")
    if isinstance(value, int):
        return "keep" if value == 16 else spec_for_bits(value, base, where)
    expect_table(value, where, keys=_SPEC_KEYS)
    kw: dict[str, Any] = {}
    for key in ("bits", "block"):
        if key in value:
            kw[key] = expect_int(value[key], f"{where}.{key}")
    for key in ("format", "rounding"):
        if key in value:
            kw[key] = expect_str(value[key], f"{where}.{key}")
    if "scale_dtype" in value:
        kw["scale_dtype"] = _dtype(value["scale_dtype"], f"{where}.scale_dtype")
    if "bits" in kw and "format" not in kw:
        return _spec(spec_for_bits(kw.pop("bits"), base, where), where, **kw)
    return _spec(base, where, **kw)


def _dtype(name: Any, where: str) -> torch.dtype:
    """A scale dtype from its name ("float32"/"fp32", "bfloat16"/"bf16") or a torch.dtype."""
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if isinstance(name, torch.dtype):
        if name not in table.values():
            raise ValueError(f"{where}: scale_dtype must be float32 or bfloat16, got {name}")
        return name
    if not isinstance(name, str):
        raise ConfigTypeError(f"{where}: expected 'float32' or 'bfloat16', got {describe(name)}")
    if name not in table:
        raise ValueError(f"{where}: scale_dtype must be 'float32' or 'bfloat16', got {name!r}")
    return table[name]


def spec_for_bits(bits: int, base: QuantSpec, where: str = "bits") -> QuantSpec:
    """``base`` moved to ``bits``: keeps its format where valid, else symmetric int."""
    expect_int(bits, where)
    fmt = base.format
    if (fmt == "fp4_e2m1" and bits != 4) or (fmt == "fp8_e4m3" and bits != 8):
        fmt = "int"
    return _spec(base, where, bits=bits, format=fmt)


def _invalid(where: str, expected: str, value: Any) -> ValueError:
    """ValueError for a wrong value of the right type, ConfigTypeError otherwise."""
    if isinstance(value, str):
        return ValueError(f"{where}: expected {expected}, got {value!r}")
    return ConfigTypeError(f"{where}: expected {expected}, got {describe(value)}")


@dataclass(frozen=True)
class ActivationPlan:
    """Storage format of saved activations, per kind.

    ``kinds`` maps kind names (see :data:`KINDS`) to an action; kinds not listed use
    ``kinds["other"]`` (default ``"keep"``). ``rules`` are tried before the defaults, so
    users can name their own modules. ``recompute`` turns rebuilding on globally;
    ``fallback`` stores a ``"recompute"`` tensor that cannot be rebuilt. Tensors with fewer
    than ``min_numel`` elements are kept. ``compiled`` decides for tensors saved inside
    ``torch.compile``d regions: ``"plan"`` (default) applies the kinds by the module that
    produced each saved value (attention recognised by its ops), a QuantSpec stores every
    saved value in that spec (attention included), ``"keep"`` stores them untouched.
    """

    kinds: Mapping[str, Action] = field(default_factory=dict)
    rules: tuple[KindRule, ...] = ()
    recompute: bool = True
    fallback: QuantSpec | Literal["keep"] = QuantSpec(bits=4, format="fp4_e2m1", block=128)
    min_numel: int = 4096
    compiled: QuantSpec | Literal["keep", "plan"] = "plan"

    def __post_init__(self) -> None:
        expect_table(self.kinds, "ActivationPlan.kinds")
        for kind, action in self.kinds.items():
            if kind not in KINDS:
                raise ValueError(
                    f"ActivationPlan: unknown kind {kind!r}; known kinds: {sorted(KINDS)}"
                )
            if not (
                isinstance(action, QuantSpec)
                or (isinstance(action, str) and action in ("keep", "recompute"))
            ):
                error = ConfigTypeError if not isinstance(action, str) else ValueError
                raise error(
                    f"ActivationPlan.kinds[{kind!r}]: invalid action {describe(action)}; "
                    "expected a QuantSpec, 'keep' or 'recompute'"
                )
        if not (
            isinstance(self.fallback, QuantSpec)
            or (isinstance(self.fallback, str) and self.fallback == "keep")
        ):
            raise _invalid("ActivationPlan.fallback", "a QuantSpec or 'keep'", self.fallback)
        if not (
            isinstance(self.compiled, QuantSpec)
            or (isinstance(self.compiled, str) and self.compiled in ("keep", "plan"))
        ):
            raise _invalid(
                "ActivationPlan.compiled", "a QuantSpec, 'keep' or 'plan'", self.compiled
            )
        expect_int(self.min_numel, "ActivationPlan.min_numel", low=0)
        expect_bool(self.recompute, "ActivationPlan.recompute")
        rules = expect_list(self.rules, "ActivationPlan.rules")
        for i, rule in enumerate(rules):
            if not isinstance(rule, KindRule):
                raise ConfigTypeError(
                    f"ActivationPlan.rules[{i}]: expected a KindRule, got {describe(rule)}"
                )
        object.__setattr__(self, "kinds", dict(self.kinds))
        object.__setattr__(self, "rules", tuple(rules))

    # ---------------------------------------------------------------- presets

    @classmethod
    def agoq(
        cls,
        bits: int = 4,
        format: str = "fp4_e2m1",
        block: int = 128,
        scale_dtype: torch.dtype = torch.float32,
        recompute: bool = True,
        norm_spec: QuantSpec | None = None,
        **kw: Any,
    ) -> ActivationPlan:
        """The paper's plan (Table 1): attention internals kept; norm inputs, the SwiGLU
        input and the attention out-projection input at ``bits``; the GEMM inputs that are
        cheap functions of those (norm outputs, the SwiGLU product) recomputed.

        ``norm_spec`` stores the residual stream (norm inputs, embedding output) in another
        format: fp4 in 32-element blocks with bf16 scales (4.5 instead of 4.25 bits) closes
        the plan's convergence gap in docs/results.md (+0.44% instead of +3.15%)."""
        spec = QuantSpec(bits=bits, format=format, block=block, scale_dtype=scale_dtype)
        residual = norm_spec or spec
        kinds: dict[str, Action] = {
            "norm_input": residual,
            "embedding_output": residual,
            "attn_proj_input": "recompute",
            "qk_norm_input": QuantSpec(bits=8, format="int", block=block, scale_dtype=scale_dtype),
            "attn_internals": "keep",
            "attn_probs": QuantSpec(bits=8, format="int", block=block, scale_dtype=scale_dtype),
            "attn_out_input": spec,
            "mlp_up_input": "recompute",
            "swiglu_input": spec,
            "mlp_down_input": "recompute",
            "lm_head_input": "recompute",
            "other": "keep",
        }
        return cls(kinds=kinds, recompute=recompute, fallback=spec, **kw)

    @classmethod
    def uniform(cls, spec: QuantSpec, *, include_other: bool = False, **kw: Any) -> ActivationPlan:
        """Every kind in ``spec``, attention internals included (the paper's failing ablation).
        ``other`` (tensors saved outside any model module) only with ``include_other``."""
        kinds: dict[str, Action] = {k: spec for k in KINDS}
        if not include_other:
            kinds["other"] = "keep"
        return cls(kinds=kinds, recompute=False, fallback=spec, **kw)

    @classmethod
    def keep_all(cls) -> ActivationPlan:
        """Store everything untouched (the context then only measures)."""
        return cls(kinds={k: "keep" for k in KINDS}, recompute=False, fallback="keep")

    # ------------------------------------------------------------- resolution

    def action(self, kind: str) -> Action:
        """What to do with a tensor of ``kind``."""
        return self.kinds.get(kind, self.kinds.get("other", "keep"))

    def kind_of(self, fqn: str, module: nn.Module) -> str | None:
        """The kind a module's saved tensors get, or None if no rule names it."""
        for rule in self.rules + DEFAULT_RULES:
            if not rule.producer and rule.matches(fqn, module):
                return rule.kind
        return None

    def producer_kind(self, fqn: str, module: nn.Module) -> str | None:
        """The kind of this module's *output*, if a producer rule names it."""
        for rule in self.rules + DEFAULT_RULES:
            if rule.producer and rule.matches(fqn, module):
                return rule.kind
        return None

    def with_bits(self, old_bits: int, new_bits: int) -> ActivationPlan:
        """A copy where every spec at ``old_bits`` moves to ``new_bits`` (16 = keep)."""

        def move(a: Action) -> Action:
            if isinstance(a, QuantSpec) and a.bits == old_bits:
                return "keep" if new_bits == 16 else spec_for_bits(new_bits, a)
            return a

        fb = self.fallback
        return dataclasses.replace(
            self,
            kinds={k: move(a) for k, a in self.kinds.items()},
            fallback=move(fb) if isinstance(fb, QuantSpec) else fb,
        )

    def for_stage(
        self,
        stage_index: int,
        num_stages: int,
        schedule: Any = "1f1b",
        *,
        n_microbatches: int | None = None,
        stages_per_rank: int = 1,
        base_bits: int = 4,
    ) -> ActivationPlan:
        """The plan for pipeline rank ``stage_index`` (DBCA-PP).

        Each rank's peak number of in-flight micro-batches N_i is counted from the real
        ``torch.distributed.pipelining`` schedule; a rank holding fewer gets more bits: the
        largest of 4/5/6/8/16 with ``N_i * bits <= max_j N_j * base_bits``, so no rank's
        stored-activation peak exceeds the most loaded rank's. Specs at ``base_bits`` move.
        """
        from ..pipeline import inflight_microbatches, stage_bits

        for name, value in (("stage_index", stage_index), ("num_stages", num_stages)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"for_stage: {name} must be an int, got {value!r}")
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index {stage_index} out of range for {num_stages} stages")
        m = n_microbatches if n_microbatches is not None else max(num_stages * stages_per_rank, 1)
        counts = inflight_microbatches(schedule, num_stages, m, stages_per_rank=stages_per_rank)
        bits = stage_bits(counts, base_bits=base_bits)[stage_index]
        if bits == base_bits:
            return self
        plan = self.with_bits(base_bits, bits)
        # Kinds the plan already stores finer than base_bits (int8 q/k norm inputs, eager
        # attention probabilities) get at least the stage's bits too.
        for old in sorted({a.bits for a in plan.kinds.values() if isinstance(a, QuantSpec)}):
            if base_bits < old < bits:
                plan = plan.with_bits(old, bits)
        return plan

    # ------------------------------------------------------------- from config

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> ActivationPlan:
        """A plan from a dict / TOML table, every value type-checked.

        Keys: ``preset`` ("agoq", "uniform", "keep"), ``bits``, ``format``, ``block``,
        ``scale_dtype``, ``kinds`` (kind -> bits | "keep" | "recompute" | spec table),
        ``rules`` (list of {kind, pattern, classes, producer}), ``min_numel``,
        ``recompute``, ``fallback`` and ``compiled`` (bits | "keep" | spec table).
        A wrong type raises ``ConfigTypeError`` (a TypeError and a ValueError), a bad value
        or an unknown key ``ValueError``; both name the field.
        """
        where = "activation plan"
        expect_table(table, where, keys=_PLAN_KEYS)
        bits = expect_int(table.get("bits", 4), f"{where} bits")
        base = _spec(
            QuantSpec(),
            where,
            bits=bits,
            format=expect_str(
                table.get("format", "fp4_e2m1" if bits == 4 else "int"), f"{where} format"
            ),
            block=expect_int(table.get("block", 128), f"{where} block"),
            scale_dtype=_dtype(table.get("scale_dtype", "float32"), f"{where} scale_dtype"),
        )
        preset = expect_str(
            table.get("preset", "agoq"), f"{where} preset", choices=("agoq", "uniform", "keep")
        )
        if preset == "agoq":
            plan = cls.agoq(
                bits=base.bits, format=base.format, block=base.block, scale_dtype=base.scale_dtype
            )
        elif preset == "uniform":
            plan = cls.uniform(base)
        else:
            plan = cls.keep_all()
        kinds = dict(plan.kinds)
        user_kinds = expect_table(table.get("kinds", {}), f"{where} kinds")
        for kind, value in user_kinds.items():
            if kind not in KINDS:
                raise ValueError(f"{where} kinds: unknown kind {kind!r}; known: {sorted(KINDS)}")
            kinds[kind] = _action(value, base, f"{where} kinds.{kind}")
        rules = []
        for i, r in enumerate(expect_list(table.get("rules", []), f"{where} rules")):
            at = f"{where} rules[{i}]"
            expect_table(r, at, keys=("kind", "pattern", "classes", "producer"))
            if "kind" not in r:
                raise ValueError(f"{at}: missing 'kind' (one of {sorted(KINDS)})")
            kind = expect_str(r["kind"], f"{at}.kind", choices=KINDS)
            pattern = expect_regex(r.get("pattern", ""), f"{at}.pattern")
            classes = expect_str_list(r.get("classes", []), f"{at}.classes")
            if not pattern and not classes:
                raise ValueError(f"{at}: needs a non-empty 'pattern' or 'classes'")
            producer = expect_bool(r.get("producer", False), f"{at}.producer")
            rules.append(KindRule(kind, pattern, classes, producer))
        changes: dict[str, Any] = {"kinds": kinds, "rules": tuple(rules)}
        if "min_numel" in table:
            changes["min_numel"] = expect_int(table["min_numel"], f"{where} min_numel", low=0)
        if "recompute" in table:
            changes["recompute"] = expect_bool(table["recompute"], f"{where} recompute")
        for key in ("fallback", "compiled"):
            if key in table:
                if key == "compiled" and table[key] == "plan":
                    changes[key] = "plan"
                    continue
                a = _action(table[key], base, f"{where} {key}")
                if a == "recompute":
                    raise ValueError(f"{where} {key}: cannot be 'recompute'")
                changes[key] = a
        return dataclasses.replace(plan, **changes)

    @classmethod
    def from_toml(
        cls, path_or_text: str | os.PathLike[str], table: str = "activations"
    ) -> ActivationPlan:
        """A plan from a TOML file (a ``Path``, or a string naming a file) or TOML text;
        reads ``[table]`` (dotted allowed; "" = the whole document).

        A string that cannot be TOML (one line, no ``=``, no ``[``) is taken as a path:
        ``FileNotFoundError`` when it does not exist.
        """
        expect_str(table, "ActivationPlan.from_toml table")
        data: Any = read_toml(path_or_text, "activation plan")
        for part in table.split(".") if table else []:
            if not isinstance(data, Mapping) or part not in data:
                raise ValueError(f"activation plan: the TOML has no [{table}] table")
            data = data[part]
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line per kind: what is stored."""
        lines = []
        for kind in KINDS:
            a = self.action(kind)
            if isinstance(a, QuantSpec):
                txt = f"{a.format} {a.bits}-bit, block {a.block}"
            elif a == "recompute":
                txt = "recomputed" if self.recompute else f"fallback ({self.fallback})"
            else:
                txt = "kept (16/32-bit)"
            lines.append(f"{kind:18s} {txt}")
        return "\n".join(lines)
