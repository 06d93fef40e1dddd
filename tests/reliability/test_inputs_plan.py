"""Bad input to the activation plan: ActivationPlan, KindRule, from_dict, from_toml (issue 10,
class 4).

Wrong types must be refused with a ``TypeError`` naming the field, not misread (a string
as a list of characters, ``"false"`` as True, ``True`` as 1); bad values with a
``ValueError`` naming the field; a missing TOML file with ``FileNotFoundError``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

from agoq import ActivationPlan, QuantSpec
from agoq.activations.plan import KindRule


class RMSNorm(nn.Module):
    pass


class Norm(nn.Module):
    pass


# ------------------------------------------------------------------ from_dict: types


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"rules": [{"kind": "norm_input", "classes": "RMSNorm"}]},
            "activation plan rules[0].classes: expected a list of strings, got str 'RMSNorm'",
        ),
        (
            {"rules": [{"kind": "norm_input", "classes": ["RMSNorm", 3]}]},
            "activation plan rules[0].classes[1]: expected a string, got int 3",
        ),
        (
            {"rules": [{"kind": "norm_input", "pattern": "x", "producer": "false"}]},
            "activation plan rules[0].producer: expected true or false, got str 'false'",
        ),
        (
            {"rules": [{"kind": "norm_input", "pattern": 3}]},
            "activation plan rules[0].pattern: expected a string",
        ),
        ({"rules": [{"kind": 1, "pattern": "x"}]}, "activation plan rules[0].kind"),
        ({"rules": "norm_input"}, "activation plan rules: expected a list"),
        ({"rules": {"kind": "norm_input"}}, "activation plan rules: expected a list"),
        ({"rules": ["norm_input"]}, "activation plan rules[0]: expected a table"),
        ({"bits": True}, "activation plan bits: expected an integer, got bool True"),
        ({"bits": "4"}, "activation plan bits"),
        ({"bits": 4.0}, "activation plan bits"),
        ({"block": "128"}, "activation plan block"),
        ({"block": False}, "activation plan block"),
        ({"format": 4}, "activation plan format"),
        ({"scale_dtype": 32}, "activation plan scale_dtype"),
        ({"preset": 1}, "activation plan preset"),
        ({"kinds": ["norm_input"]}, "activation plan kinds: expected a table"),
        ({"kinds": {"norm_input": True}}, "activation plan kinds.norm_input"),
        ({"kinds": {"norm_input": 4.0}}, "activation plan kinds.norm_input"),
        ({"kinds": {"norm_input": {"bits": True}}}, "activation plan kinds.norm_input.bits"),
        ({"kinds": {"norm_input": {"block": "64"}}}, "activation plan kinds.norm_input.block"),
        ({"kinds": {"norm_input": {"format": 4}}}, "activation plan kinds.norm_input.format"),
        ({"min_numel": True}, "activation plan min_numel: expected an integer, got bool True"),
        ({"min_numel": 10.5}, "activation plan min_numel"),
        ({"recompute": "false"}, "activation plan recompute: expected true or false"),
        ({"recompute": 0}, "activation plan recompute"),
        ({"fallback": True}, "activation plan fallback"),
        ({"compiled": [8]}, "activation plan compiled"),
    ],
)
def test_from_dict_wrong_types_are_type_errors_naming_the_field(table, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        ActivationPlan.from_dict(table)


def test_from_dict_of_a_non_table_is_a_type_error():
    for bad in ("preset = 'agoq'", ["agoq"], 4, None):
        with pytest.raises(TypeError, match="activation plan: expected a table"):
            ActivationPlan.from_dict(bad)


# ----------------------------------------------------------------- from_dict: values


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rules": [{"kind": "norm_input", "pattern": "(unclosed"}]}, "rules[0].pattern"),
        ({"rules": [{"kind": "norm_input", "pattern": "[a-"}]}, "invalid regular expression"),
        ({"rules": [{"pattern": "x"}]}, "rules[0]: missing 'kind'"),
        ({"rules": [{"kind": "attention", "pattern": "x"}]}, "rules[0].kind"),
        ({"rules": [{"kind": "norm_input"}]}, "rules[0]: needs a non-empty"),
        ({"rules": [{"kind": "norm_input", "classes": []}]}, "rules[0]: needs a non-empty"),
        ({"rules": [{"kind": "norm_input", "pattern": "x", "regex": "y"}]}, "unknown key"),
        ({"bits": 7}, "bits"),
        ({"bits": -4}, "bits"),
        ({"block": 100}, "block"),
        ({"block": 0}, "block"),
        ({"format": "nf4"}, "format"),
        ({"preset": "fancy"}, "preset"),
        ({"scale_dtype": "float16"}, "scale_dtype"),
        ({"min_numel": -1}, "min_numel"),
        ({"kinds": {"norm_input": 7}}, "kinds.norm_input"),
        ({"kinds": {"norm_input": "drop"}}, "kinds.norm_input"),
        ({"kinds": {"norm_input": {"bits": 4, "colour": 1}}}, "unknown key"),
        ({"kinds": {"norm_input": {"rounding": "up"}}}, "kinds.norm_input"),
        ({"kinds": {"attention": 4}}, "unknown kind 'attention'"),
        ({"fallback": "recompute"}, "fallback"),
        ({"compiled": "maybe"}, "compiled"),
        ({"bitz": 4}, "unknown key"),
    ],
)
def test_from_dict_bad_values_are_value_errors_naming_the_field(table, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ActivationPlan.from_dict(table)


def test_valid_table_still_means_what_it_says():
    plan = ActivationPlan.from_dict(
        {
            "bits": 8,
            "kinds": {"attn_internals": "keep", "swiglu_input": {"bits": 6, "block": 64}},
            "rules": [{"kind": "norm_input", "classes": ["Norm"], "producer": False}],
            "min_numel": 0,
            "recompute": False,
        }
    )
    assert plan.action("swiglu_input") == QuantSpec(bits=6, format="int", block=64)
    assert plan.action("attn_internals") == "keep"
    assert plan.recompute is False and plan.min_numel == 0
    # classes match whole class names: "Norm" names Norm, not RMSNorm by substring.
    assert plan.rules[0].matches("x", Norm()) and not plan.rules[0].matches("x", RMSNorm())


# ------------------------------------------------------------------------- KindRule


@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"kind": "norm_input", "classes": "RMSNorm"}, TypeError, "KindRule.classes"),
        ({"kind": "norm_input", "pattern": "x", "producer": "false"}, TypeError, "producer"),
        ({"kind": "norm_input", "pattern": "x", "producer": 1}, TypeError, "producer"),
        ({"kind": "norm_input", "pattern": 3}, TypeError, "KindRule.pattern"),
        ({"kind": 3, "pattern": "x"}, TypeError, "KindRule.kind"),
        ({"kind": "norm_input", "pattern": "(x"}, ValueError, "KindRule.pattern"),
        ({"kind": "nope", "pattern": "x"}, ValueError, "KindRule.kind"),
    ],
)
def test_kind_rule_refuses_bad_fields(kwargs, exc, field):
    with pytest.raises(exc, match=re.escape(field)):
        KindRule(**kwargs)


def test_kind_rule_with_a_class_string_does_not_match_substrings():
    # Old behaviour: classes="RMSNorm" was kept as a string, so `"Norm" in "RMSNorm"` made
    # every module class named Norm (or R, M, S...) a norm input. Now refused outright.
    with pytest.raises(TypeError):
        KindRule("norm_input", classes="RMSNorm")  # type: ignore[arg-type]
    rule = KindRule("norm_input", classes=["RMSNorm"])  # a list is fine
    assert rule.classes == ("RMSNorm",)
    assert rule.matches("x", RMSNorm()) and not rule.matches("x", Norm())


# ------------------------------------------------------------ ActivationPlan fields


@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"kinds": [("norm_input", "keep")]}, TypeError, "ActivationPlan.kinds"),
        ({"kinds": {"norm_input": 4}}, TypeError, "ActivationPlan.kinds['norm_input']"),
        ({"kinds": {"norm_input": "drop"}}, ValueError, "ActivationPlan.kinds['norm_input']"),
        ({"rules": "norm_input"}, TypeError, "ActivationPlan.rules"),
        ({"rules": [{"kind": "norm_input"}]}, TypeError, "ActivationPlan.rules[0]"),
        ({"recompute": "false"}, TypeError, "ActivationPlan.recompute"),
        ({"recompute": 1}, TypeError, "ActivationPlan.recompute"),
        ({"min_numel": True}, TypeError, "ActivationPlan.min_numel"),
        ({"min_numel": 4096.0}, TypeError, "ActivationPlan.min_numel"),
        ({"min_numel": -1}, ValueError, "ActivationPlan.min_numel"),
        ({"fallback": 4}, TypeError, "ActivationPlan.fallback"),
        ({"fallback": "recompute"}, ValueError, "ActivationPlan.fallback"),
        ({"compiled": 8}, TypeError, "ActivationPlan.compiled"),
    ],
)
def test_activation_plan_constructor_refuses_bad_fields(kwargs, exc, field):
    with pytest.raises(exc, match=re.escape(field)):
        ActivationPlan(**kwargs)


# ------------------------------------------------------------------------ from_toml


def test_missing_toml_file_is_file_not_found(tmp_path):
    missing = tmp_path / "plan.toml"
    with pytest.raises(FileNotFoundError, match="plan.toml"):
        ActivationPlan.from_toml(str(missing))
    with pytest.raises(FileNotFoundError, match="plan.toml"):
        ActivationPlan.from_toml(missing)  # a Path
    with pytest.raises(FileNotFoundError):
        ActivationPlan.from_toml("configs/agoq.toml")


def test_toml_file_text_and_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[activations]\npreset = "uniform"\nbits = 8\n')
    for source in (path, str(path), path.read_text()):
        plan = ActivationPlan.from_toml(source)
        assert plan.action("norm_input") == QuantSpec(bits=8, format="int", block=128)
    with pytest.raises(ValueError, match="invalid TOML"):
        ActivationPlan.from_toml("[activations]\nbits = = 4\n")
    with pytest.raises(ValueError, match=r"no \[training\] table"):
        ActivationPlan.from_toml(path, table="training")
    with pytest.raises(TypeError, match=re.escape("rules[0].classes")):
        ActivationPlan.from_toml('[activations]\nrules = [{kind = "norm_input", classes = "X"}]')
    with pytest.raises(TypeError):
        ActivationPlan.from_toml(b"[activations]")  # type: ignore[arg-type]
    assert Path(path).exists()
