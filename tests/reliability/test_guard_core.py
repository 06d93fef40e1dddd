"""NumericsGuard core: argument validation, due(), observe() actions, NaN, state round trip."""

from __future__ import annotations

import math
import warnings

import pytest

import agoq
from agoq.guard import NumericsError, NumericsGuard


def test_exported_from_package() -> None:
    assert agoq.NumericsGuard is NumericsGuard
    assert agoq.NumericsError is NumericsError
    assert issubclass(NumericsError, RuntimeError)
    assert {"NumericsGuard", "NumericsError"} <= set(agoq.__all__)


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"every": 0}, ValueError, "every"),
        ({"every": -3}, ValueError, "every"),
        ({"every": True}, TypeError, "every"),
        ({"every": 2.0}, TypeError, "every"),
        ({"every": "100"}, TypeError, "every"),
        ({"threshold": 0.0}, ValueError, "threshold"),
        ({"threshold": -0.1}, ValueError, "threshold"),
        ({"threshold": math.nan}, ValueError, "threshold"),
        ({"threshold": math.inf}, ValueError, "threshold"),
        ({"threshold": True}, TypeError, "threshold"),
        ({"threshold": "0.05"}, TypeError, "threshold"),
        ({"action": "ignore"}, ValueError, "action"),
        ({"action": None}, ValueError, "action"),
        ({"log": "stdout"}, TypeError, "log"),
        ({"activation_threshold": 0}, ValueError, "activation_threshold"),
        ({"activation_threshold": math.nan}, ValueError, "activation_threshold"),
        ({"activation_threshold": "1"}, TypeError, "activation_threshold"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, exc: type[Exception], word: str) -> None:
    with pytest.raises(exc, match=word):
        NumericsGuard(**kwargs)


def test_defaults_and_due() -> None:
    g = NumericsGuard()
    assert (g.every, g.threshold, g.action) == (100, 0.05, "fallback")
    g = NumericsGuard(every=3)
    assert [s for s in range(10) if g.due(s)] == [0, 3, 6, 9]
    with pytest.raises(TypeError, match="counter"):
        g.due(True)


def test_activation_names_have_their_own_threshold() -> None:
    g = NumericsGuard(threshold=0.05, activation_threshold=0.5, action="raise")
    assert g.threshold_for("grad/bucket0") == 0.05
    assert g.threshold_for("activations/norm_input") == 0.5
    assert g.observe("activations/norm_input", 0.3) is False  # 4-bit activations: normal
    with pytest.raises(NumericsError, match="grad/bucket0"):
        g.observe("grad/bucket0", 0.3)  # int8 gradients: far off
    with pytest.raises(NumericsError, match="activations/attn_internals"):
        g.observe("activations/attn_internals", 0.6)


def test_below_threshold_does_nothing() -> None:
    lines: list[str] = []
    g = NumericsGuard(threshold=0.1, log=lines.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert g.observe("activations/mlp", 0.05, step=7) is False
        assert g.observe("activations/mlp", 0.1, step=8) is False  # at threshold: fine
    assert not g.is_fallback("activations/mlp")
    assert g.history["activations/mlp"] == [(7, 0.05), (8, 0.1)]
    assert len(lines) == 2 and "activations/mlp" in lines[0] and "step 7" in lines[0]


def test_fallback_warns_once_and_marks() -> None:
    g = NumericsGuard(threshold=0.1)
    with pytest.warns(RuntimeWarning, match=r"grad/bucket3.*exceeds threshold.*full precision"):
        assert g.observe("grad/bucket3", 0.5, step=100) is True
    assert g.is_fallback("grad/bucket3")
    assert not g.is_fallback("grad/bucket2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same name
        assert g.observe("grad/bucket3", 0.7) is True
        assert g.observe("grad/bucket3", 0.01) is True  # stays in full precision
    assert g.fallbacks == {"grad/bucket3"}


def test_warn_action_never_switches() -> None:
    g = NumericsGuard(threshold=0.1, action="warn", activation_threshold=0.1)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="activations/attn"):
            assert g.observe("activations/attn", 0.3) is False
    assert not g.is_fallback("activations/attn")


def test_raise_action_names_everything() -> None:
    g = NumericsGuard(threshold=0.1, action="raise", activation_threshold=0.1)
    with pytest.raises(NumericsError, match=r"activations/attn.*2\.500e-01.*0\.1"):
        g.observe("activations/attn", 0.25, step=3)
    assert g.history["activations/attn"] == [(3, 0.25)]


@pytest.mark.parametrize("action", ["fallback", "warn", "raise"])
def test_nan_is_recorded_never_acts(action: str) -> None:
    g = NumericsGuard(threshold=0.1, action=action)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert g.observe("activations/mlp", math.nan, step=5) is False
    assert not g.is_fallback("activations/mlp")
    ((s, e),) = g.history["activations/mlp"]
    assert s == 5 and math.isnan(e)


def test_inf_acts() -> None:
    g = NumericsGuard(threshold=0.1, action="raise")
    with pytest.raises(NumericsError):
        g.observe("grad/bucket0", math.inf)


def test_observe_rejects_bad_input() -> None:
    g = NumericsGuard()
    with pytest.raises(TypeError, match="name"):
        g.observe("", 0.1)
    with pytest.raises(TypeError, match="rel_err"):
        g.observe("x", True)
    with pytest.raises(TypeError, match="step"):
        g.observe("x", 0.1, step=1.5)


def test_state_dict_round_trip() -> None:
    g = NumericsGuard(threshold=0.1)
    with pytest.warns(RuntimeWarning):
        g.observe("grad/bucket1", 0.9, step=0)
    g.observe("activations/mlp", 0.01, step=0)
    h = NumericsGuard(threshold=0.1)
    h.load_state_dict(g.state_dict())
    assert h.is_fallback("grad/bucket1") and not h.is_fallback("activations/mlp")
    assert h.checks == g.checks == 2
    assert h.history == g.history
    with pytest.raises(ValueError, match="missing"):
        h.load_state_dict({})
    with pytest.raises(TypeError, match="fallbacks"):
        h.load_state_dict({"fallbacks": "grad/bucket1", "checks": 0})
    with pytest.raises(TypeError, match="dict"):
        h.load_state_dict([])  # type: ignore[arg-type]
