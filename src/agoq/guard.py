"""Live numerics guard: measure agoq's effect on the running job and act on it.

Every ``every`` steps the guard compares what agoq produced with the unquantized
result (one micro-batch's gradient for activations, one bucket reduced both ways
for gradients), records the relative RMS error per name and, above ``threshold``,
warns, switches that name to full precision ("fallback") or raises.

Names: ``"activations/<kind>"`` for activation kinds, ``"grad/bucket<index>"``
for DDP buckets.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ._compat import module_buffers, top_saved_tensors_hooks

if TYPE_CHECKING:
    from .activations import ActivationContext, ActivationPlan

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


def _check_threshold(value: object, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"NumericsGuard: {name} must be a finite float > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"NumericsGuard: {name} must be a finite float > 0, got {value}")
    return value


class NumericsGuard:
    """Periodic check of agoq's error against the unquantized result.

    Args:
        every: run a check every ``every`` steps (``due(step)`` is true when
            ``step % every == 0``).
        threshold: relative RMS error above which the guard acts (gradient buckets and
            any name not starting with ``"activations"``).
        activation_threshold: the same for ``"activations"`` names. Its own default,
            because 4-bit activations legitimately change one step's gradient far more than
            int8 gradients do: the paper's plan gives ~0.11 on the reference LLaMA and trains
            to within 0.4-3 % of the baseline's loss, while storing everything in 4 bits
            (which fails to train) gives ~20 (docs/results.md); 0.5 separates the two.
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
        *,
        activation_threshold: float = 0.5,
    ) -> None:
        self.every = _check_int("every", every)
        self.threshold = _check_threshold(threshold)
        self.activation_threshold = _check_threshold(activation_threshold, "activation_threshold")
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
            f"activation_threshold={self.activation_threshold}, "
            f"action={self.action!r}, fallbacks={sorted(self._fallback)})"
        )

    def due(self, counter: int) -> bool:
        """True when a check should run at step/call number ``counter``."""
        if isinstance(counter, bool) or not isinstance(counter, int):
            raise TypeError(f"NumericsGuard.due: counter must be an int, got {counter!r}")
        return counter % self.every == 0

    def threshold_for(self, name: str) -> float:
        """The threshold that applies to ``name``."""
        return self.activation_threshold if name.startswith("activations") else self.threshold

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
        self._record(name, rel_err, step)
        limit = self.threshold_for(name)
        if math.isnan(rel_err) or rel_err <= limit:
            return name in self._fallback
        where = "" if step is None else f" at step {step}"
        return self._act(
            name,
            f"agoq numerics guard{where}: {name} relative error {rel_err:.3e} "
            f"exceeds threshold {limit:g}",
        )

    # ----------------------------------------------------------- activations

    def apply(self, plan: ActivationPlan) -> ActivationPlan:
        """``plan`` with every activation kind this guard switched to full precision kept."""
        kinds = [n.split("/", 1)[1] for n in self._fallback if n.startswith("activations/")]
        todo = {k: "keep" for k in kinds if k != "compiled" and plan.action(k) != "keep"}
        changes: dict[str, Any] = {}
        if todo:
            changes["kinds"] = {**plan.kinds, **todo}
        if "compiled" in kinds and _is_spec(plan.compiled):
            # One spec for every value saved in compiled regions: back to the per-kind plan.
            changes["compiled"] = "plan"
        return dataclasses.replace(plan, **changes) if changes else plan

    def check_activations(
        self,
        step: int,
        ctx: ActivationContext,
        model: nn.Module,
        loss_fn: Callable[[], torch.Tensor],
        *,
        group: Any = None,
    ) -> dict[str, float]:
        """Every ``every`` steps, measure what ``ctx``'s plan does to one micro-batch's gradient.

        Call it once per step, outside ``with ctx:`` (after backward, before the optimizer
        step, for instance); ``loss_fn()`` must compute the loss of one micro-batch with
        ``model`` (autocast included, if the loop uses it), e.g.
        ``lambda: loss_fn(model, batch)``. On a due step it computes that loss's parameter
        gradient twice with ``torch.autograd.grad`` (``p.grad`` is never touched), once
        under a fresh context with ``ctx.plan`` and once without any context, with the RNG
        state (CPU and CUDA) and the module buffers restored around each pass, so dropout
        draws the same masks and the training run is not perturbed. It records the relative
        RMS error over all parameter gradients as ``"activations"``; when that exceeds the
        activation threshold it attributes it, one pass per quantized kind with only that kind
        quantized, and observes each as ``"activations/<kind>"``. With ``action="fallback"``
        the offending kinds (or, if none exceeds the threshold alone, the worst one) are
        switched to ``"keep"`` in ``ctx.plan``. Every call (due or not) re-applies earlier
        fallbacks to ``ctx.plan``, so a resumed guard (``load_state_dict``) takes effect.

        A non-finite reference gradient gives NaN (recorded, never acts); a non-finite
        quantized gradient with a finite reference gives +Inf (acts). Under DDP pass the
        inner module (``ddp.module``): its forward does not involve DDP's reducer. With
        ``torch.distributed`` initialized, the squared errors are summed over ``group``
        (default: the world) so every rank takes the same decision: call it on every rank
        of ``group``; ``group="local"`` measures this rank alone (no communication).

        Returns the errors measured by this call by name (empty when not due).
        """
        from .activations import KINDS, quantize_activations

        plan = getattr(ctx, "plan", None)
        if type(plan).__name__ != "ActivationPlan":
            raise TypeError(
                "NumericsGuard.check_activations: ctx must be the context returned by "
                f"agoq.quantize_activations(plan), got {type(ctx).__name__}"
            )
        if self.apply(plan) is not plan:
            ctx.plan = plan = self.apply(plan)
        if not self.due(step):
            return {}
        params = _check_model(model)
        if not callable(loss_fn):
            raise TypeError(
                f"NumericsGuard.check_activations: loss_fn must be a callable, got {loss_fn!r}"
            )
        if isinstance(group, str) and group != "local":
            raise ValueError(
                f"NumericsGuard: group must be a ProcessGroup, None or 'local', got {group!r}"
            )
        if top_saved_tensors_hooks() is not None:
            raise RuntimeError(
                "NumericsGuard.check_activations must run outside `with ctx:` (and outside any "
                "saved_tensors_hooks): its reference pass has to see plain PyTorch"
            )
        # The lossy kinds: stored in a spec, or "recompute" stored in the fallback spec
        # because rebuilding is off. Rebuilt kinds are exact functions of stored ones.
        kinds = [k for k in KINDS if _lossy(plan, k)]
        if not kinds and not _is_spec(plan.compiled):
            return {}  # the plan stores everything as it is: nothing to measure
        out: dict[str, float] = {}
        with _frozen_state(model, params) as reset:
            ref = _grads(loss_fn, params, None, reset)
            quant = _grads(loss_fn, params, quantize_activations(plan), reset)
            total = _rel_err(quant, ref, group)
            self._record("activations", total, step)
            out["activations"] = total
            limit = self.activation_threshold
            if math.isnan(total) or total <= limit:
                return out
            errs: dict[str, float] = {}
            # Kind K's pass stores only K lossily; rebuilt kinds stay rebuilt, so what is
            # recomputed from K (a norm's output from its quantized input) is K's error too.
            lossless = {k: (plan.action(k) if k not in kinds else "keep") for k in KINDS}
            # A spec in plan.compiled applies to compiled regions whatever the kind: it is
            # measured as its own pseudo-kind "compiled", and left out of the kinds' passes.
            compiled = "plan" if _is_spec(plan.compiled) else plan.compiled
            singles = {
                kind: dataclasses.replace(
                    plan, kinds={**lossless, kind: plan.action(kind)}, compiled=compiled
                )
                for kind in kinds
            }
            if _is_spec(plan.compiled):
                singles["compiled"] = dataclasses.replace(plan, kinds=lossless)
            for kind, single in singles.items():
                q_k = _grads(loss_fn, params, quantize_activations(single), reset)
                errs[kind] = _rel_err(q_k, ref, group)
        del ref, quant
        ranked = sorted(errs, key=lambda k: -errs[k] if not math.isnan(errs[k]) else math.inf)
        for kind in ranked:
            out[f"activations/{kind}"] = errs[kind]
        over = [k for k in ranked if errs[k] > limit]
        for kind in ranked:
            self.observe(f"activations/{kind}", errs[kind], step=step)
        if not over and ranked:
            # The kinds' errors add up past the threshold though none exceeds it alone:
            # act on the worst one; the next check sees whether that was enough.
            worst = ranked[0]
            self._act(
                f"activations/{worst}",
                f"agoq numerics guard at step {step}: activations relative error {total:.3e} "
                f"exceeds threshold {limit:g}; no kind exceeds it alone, the largest "
                f"is {worst} ({errs[worst]:.3e})",
            )
        new = self.apply(ctx.plan)
        if new is not ctx.plan:
            ctx.plan = new
        return out

    def _record(self, name: str, rel_err: float, step: int | None) -> None:
        self.history.setdefault(name, []).append((step, rel_err))
        self.checks += 1
        if self.log is not None:
            where = "" if step is None else f" at step {step}"
            self.log(
                f"agoq numerics{where}: {name} rel_err={rel_err:.3e} "
                f"(threshold {self.threshold_for(name):g})"
            )

    def _act(self, name: str, msg: str) -> bool:
        if self.action == "raise":
            raise NumericsError(msg)
        if self.action == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return name in self._fallback
        if name not in self._fallback:
            self._fallback.add(name)
            warnings.warn(
                f"{msg}; switching {name} to full precision", RuntimeWarning, stacklevel=3
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        """Fallbacks, counters and history, for checkpoint/resume."""
        return {
            "every": self.every,
            "threshold": self.threshold,
            "activation_threshold": self.activation_threshold,
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


# ------------------------------------------------------------------ helpers


def _is_spec(action: object) -> bool:
    return type(action).__name__ == "QuantSpec"


def _lossy(plan: ActivationPlan, kind: str) -> bool:
    action = plan.action(kind)
    if action == "recompute":
        return not plan.recompute and _is_spec(plan.fallback)
    return _is_spec(action)


def _check_model(model: nn.Module) -> list[torch.Tensor]:
    """The parameters to differentiate; refuses wrappers whose forward has side effects."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "NumericsGuard.check_activations: pass the inner module (ddp.module), not the "
            "DistributedDataParallel wrapper: a forward through DDP prepares its reducer for "
            "a backward that the check never runs"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"NumericsGuard.check_activations: model must be an nn.Module, got {type(model).__name__}"
        )
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, FullyShardedDataParallel) or any(isinstance(p, DTensor) for p in params):
        raise NotImplementedError(
            "NumericsGuard.check_activations does not support FSDP/DTensor parameters: FSDP's "
            "backward hooks would reduce the check's gradients into p.grad"
        )
    if not params:
        raise ValueError("NumericsGuard.check_activations: the model has no trainable parameters")
    return params


@contextmanager
def _frozen_state(model: nn.Module, params: list[torch.Tensor]) -> Iterator[Callable[[], None]]:
    """Yield ``reset()``, which puts the RNG back to its state at entry; at exit, restore
    the RNG and every buffer (replaced or modified in place, e.g. BatchNorm statistics)."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    buffers = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in module_buffers(m).items()
        if b is not None
    ]
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

        def reset() -> None:
            torch.set_rng_state(cpu)
            for d, state in cuda:
                torch.cuda.set_rng_state(state, d)

        try:
            yield reset
        finally:
            with torch.no_grad():
                for m, name, b, copy in buffers:
                    own = module_buffers(m)
                    if own.get(name) is not b:
                        own[name] = b
                    # Compared, not version-checked: batch_norm updates its running
                    # statistics in place without bumping _version.
                    if not torch.equal(b, copy):
                        b.copy_(copy)


def _grads(
    loss_fn: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    ctx: Any,
    reset: Callable[[], None],
) -> list[torch.Tensor | None]:
    reset()
    with torch.enable_grad():
        if ctx is not None:
            with ctx:
                loss = loss_fn()
        else:
            loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(
                "NumericsGuard.check_activations: loss_fn() must return a scalar tensor that "
                f"requires grad, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def _rel_err(quant: list[torch.Tensor | None], ref: list[torch.Tensor | None], group: Any) -> float:
    """||quant - ref|| / ||ref|| over all gradients (fp64 sums, one host sync)."""
    num: list[torch.Tensor] = []
    den: list[torch.Tensor] = []
    for q, r in zip(quant, ref, strict=True):
        if q is None and r is None:
            continue
        if r is None:
            r = torch.zeros_like(q)
        if q is None:
            q = torch.zeros_like(r)
        r32 = r.float()
        num.append(torch.linalg.vector_norm(q.float() - r32, dtype=torch.float64).square())
        den.append(torch.linalg.vector_norm(r32, dtype=torch.float64).square())
    if not num:
        return 0.0
    sums = torch.stack([torch.stack(num).sum(), torch.stack(den).sum()])
    import torch.distributed as dist

    if isinstance(group, str):
        if group != "local":
            raise ValueError(
                f"NumericsGuard: group must be a ProcessGroup, None or 'local', got {group!r}"
            )
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        sums = sums.cpu() if dist.get_backend(group) == "gloo" else sums
        dist.all_reduce(sums, group=group)
    n, d = (float(v) for v in sums.tolist())
    if not math.isfinite(d):
        return math.nan  # a non-finite step: says nothing about agoq
    if not math.isfinite(n):
        return math.inf  # finite reference, non-finite quantized gradient: agoq's fault
    if d == 0.0:
        return 0.0 if n == 0.0 else math.inf
    return math.sqrt(n / d)
