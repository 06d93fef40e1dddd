"""Live numerics guard: measure agoq's effect on the running job and act on it.

Every ``every`` steps the guard compares what agoq produced with the unquantized
result (one micro-batch's gradient for activations, one bucket reduced both ways
for gradients), records the relative RMS error per name and, above ``threshold``,
warns, switches that name to full precision ("fallback") or raises.

Names: ``"activations/<kind>"`` for activation kinds, ``"grad/bucket<index>"``
for DDP buckets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["NumericsError", "NumericsGuard"]

_ACTIONS = ("fallback", "warn", "raise")


class NumericsError(RuntimeError):
    """Raised by :class:`NumericsGuard` when ``action="raise"`` and a check fails."""


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; True as a period would be a silent misread.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"NumericsGuard: {name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"NumericsGuard: {name} must be >= 1, got {value}")
    return value


def _check_threshold(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"NumericsGuard: threshold must be a finite float > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"NumericsGuard: threshold must be a finite float > 0, got {value}")
    return value


class NumericsGuard:
    """Periodic check of agoq's error against the unquantized result.

    Args:
        every: run a check every ``every`` steps (``due(step)`` is true when
            ``step % every == 0``).
        threshold: relative RMS error above which the guard acts.
        action: ``"fallback"`` warns once and switches the offending name to
            full precision; ``"warn"`` only warns (every time); ``"raise"``
            raises :class:`NumericsError`.
        log: called with one line per observation (default: no logging).
    """

    def __init__(
        self,
        every: int = 100,
        threshold: float = 0.05,
        action: Literal["fallback", "warn", "raise"] = "fallback",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.every = _check_int("every", every)
        self.threshold = _check_threshold(threshold)
        if not isinstance(action, str) or action not in _ACTIONS:
            raise ValueError(f"NumericsGuard: action must be one of {_ACTIONS}, got {action!r}")
        self.action: str = action
        if log is not None and not callable(log):
            raise TypeError(f"NumericsGuard: log must be callable or None, got {log!r}")
        self.log = log
        self.history: dict[str, list[tuple[int | None, float]]] = {}
        self._fallback: set[str] = set()
        self.checks = 0  # number of observations made (for state/resume and reports)

    def __repr__(self) -> str:
        return (
            f"NumericsGuard(every={self.every}, threshold={self.threshold}, "
            f"action={self.action!r}, fallbacks={sorted(self._fallback)})"
        )

    def due(self, counter: int) -> bool:
        """True when a check should run at step/call number ``counter``."""
        if isinstance(counter, bool) or not isinstance(counter, int):
            raise TypeError(f"NumericsGuard.due: counter must be an int, got {counter!r}")
        return counter % self.every == 0

    def is_fallback(self, name: str) -> bool:
        """True when ``name`` has been switched to full precision."""
        return name in self._fallback

    @property
    def fallbacks(self) -> frozenset[str]:
        """Names switched to full precision so far."""
        return frozenset(self._fallback)

    def observe(self, name: str, rel_err: float, *, step: int | None = None) -> bool:
        """Record ``rel_err`` for ``name`` and act on it; True when ``name`` is in full precision.

        A NaN ``rel_err`` (a non-finite step) is recorded but never acts: a
        non-finite batch says nothing about the codec. +Inf (finite reference,
        non-finite quantized result) is a real failure and acts like any error
        above threshold.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"NumericsGuard.observe: name must be a non-empty str, got {name!r}")
        if isinstance(rel_err, bool):
            raise TypeError("NumericsGuard.observe: rel_err must be a float, got a bool")
        rel_err = float(rel_err)
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"NumericsGuard.observe: step must be an int or None, got {step!r}")
        self.history.setdefault(name, []).append((step, rel_err))
        self.checks += 1
        where = "" if step is None else f" at step {step}"
        if self.log is not None:
            self.log(
                f"agoq numerics{where}: {name} rel_err={rel_err:.3e} (threshold {self.threshold:g})"
            )
        if math.isnan(rel_err) or rel_err <= self.threshold:
            return name in self._fallback
        msg = (
            f"agoq numerics guard{where}: {name} relative error {rel_err:.3e} "
            f"exceeds threshold {self.threshold:g}"
        )
        if self.action == "raise":
            raise NumericsError(msg)
        if self.action == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return name in self._fallback
        if name not in self._fallback:
            self._fallback.add(name)
            warnings.warn(msg + "; switching it to full precision", RuntimeWarning, stacklevel=2)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Fallbacks, counters and history, for checkpoint/resume."""
        return {
            "every": self.every,
            "threshold": self.threshold,
            "action": self.action,
            "fallbacks": sorted(self._fallback),
            "checks": self.checks,
            "history": {k: [list(e) for e in v] for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore fallbacks and counters saved by :meth:`state_dict`.

        The configuration (every/threshold/action) is the constructor's; the
        saved one is not applied, so a resumed run may change it on purpose.
        """
        if not isinstance(state, dict):
            raise TypeError(
                f"NumericsGuard.load_state_dict: expected a dict, got {type(state).__name__}"
            )
        missing = [k for k in ("fallbacks", "checks") if k not in state]
        if missing:
            raise ValueError(f"NumericsGuard.load_state_dict: missing keys {missing}")
        fallbacks = state["fallbacks"]
        if isinstance(fallbacks, str) or not all(isinstance(n, str) for n in fallbacks):
            raise TypeError("NumericsGuard.load_state_dict: 'fallbacks' must be a list of str")
        checks = state["checks"]
        if isinstance(checks, bool) or not isinstance(checks, int) or checks < 0:
            raise TypeError(
                f"NumericsGuard.load_state_dict: 'checks' must be an int >= 0, got {checks!r}"
            )
        history: dict[str, list[tuple[int | None, float]]] = {}
        for k, v in dict(state.get("history", {})).items():
            history[str(k)] = [(None if s is None else int(s), float(e)) for s, e in v]
        self._fallback = set(fallbacks)
        self.checks = checks
        self.history = history
