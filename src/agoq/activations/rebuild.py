"""Module-level rebuild: the paper's Case 1 for any norm or activation module.

A hand-written RMSNorm (``x * rsqrt(mean(x²)) * w`` with fp32 casts, as HF's
``LlamaRMSNorm``) saves several tensors of its own for backward: an fp32 copy of its input,
the normalised input, ``rstd``. Recognising each op would never end. Instead, a *cheap*
module (a norm or an elementwise activation, decided by :func:`role_of` from what the module
computes) stores only its quantized input; every tensor its forward saves is stored as
"rebuild me" (0 bytes), and in backward the first such tensor asked for runs the module's
forward again from the stored input, under the autocast state of the forward, recording the
tensors it saves in the same order (what ``torch.utils.checkpoint``'s non-reentrant mode
does for a whole region). A forward that saves a different sequence the second time raises
instead of handing autograd wrong tensors. The module's *output* (the GEMM input that
follows a norm) is rebuilt the same way, without grad, when a GEMM's backward asks for it.

The module call path is untouched (no wrapper, no patched ``forward``): the activation
context's module hooks start and end a :class:`ModuleCall`, and its pack hook hands saves
made during the call to it.
"""

from __future__ import annotations

import inspect
import math
import weakref
from typing import Any

import torch
from torch import nn

from .._compat import never_rebuilt_types
from ..quant.codec import is_dtensor
from .store import Handle

_SINGLE: dict[type, bool] = {}


def single_input(module: nn.Module) -> bool:
    """True when the module's ``forward`` takes exactly one argument: a call then cannot
    pass keyword arguments the module hooks would not see (and a replay would miss)."""
    cls = type(module)
    ok = _SINGLE.get(cls)
    if ok is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        ok = len(params) == 2 and all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
        )
        _SINGLE[cls] = ok
    return ok


def _probe_input(x: torch.Tensor) -> torch.Tensor:
    """A small deterministic input shaped like ``x`` in its last dim (no RNG is drawn)."""
    d = x.shape[-1]
    shape = (2,) + (1,) * (x.dim() - 2) + (d,) if x.dim() >= 2 else (d,)
    n = math.prod(shape)
    v = torch.arange(n, device=x.device, dtype=torch.float32)
    return (torch.sin(v * 0.7 + 0.2) * 2.0 + 0.1).reshape(shape).to(x.dtype)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=3e-2, atol=3e-2 * scale + 1e-6))


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def role_of(module: nn.Module, x: Any) -> str | None:
    """``"norm"``, ``"activation"`` or None: whether ``module`` is cheap to run again and
    what it computes, probed once on a small input shaped like ``x`` (its first call's).

    A candidate is a leaf module with no buffers (none of running statistics) and either
    at most two 1-D parameters the size of ``x``'s last dim (a norm's weight and bias) or
    no parameters at all. It is a *norm* when its output row is invariant to scaling the
    input row and couples the elements of a row; an *activation* when it is elementwise,
    deterministic and not linear. A module that draws random numbers is never rebuilt.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        return None
    if is_dtensor(x):
        # A DTensor forward may run collectives: a probe or a replay that one rank runs
        # and another does not would hang. Tensor-parallel saves are stored by kind.
        return None
    # Never rebuilt: dropout and norms with running statistics (random numbers, state
    # updates); Identity saves nothing.
    if (
        isinstance(module, (*never_rebuilt_types(), nn.Identity))
        or next(module.children(), None) is not None
    ):
        return None
    if next(module.buffers(), None) is not None:
        return None
    params = list(module.parameters(recurse=False))
    d = x.shape[-1]
    if len(params) > 2 or any(p.dim() != 1 or p.numel() != d for p in params):
        return None
    before = _rng_states(x.device)
    try:
        with torch.no_grad():
            role = _probe(module, _probe_input(x), has_params=bool(params))
    except Exception:  # a module that wants other inputs: not ours to rebuild
        role = None
    if any(not torch.equal(a, b) for a, b in zip(before, _rng_states(x.device), strict=True)):
        torch.set_rng_state(before[0])  # the probe must not shift the user's random stream
        if len(before) > 1:
            torch.cuda.set_rng_state(before[1], x.device)
        role = None
    return role


def _probe(module: nn.Module, p: torch.Tensor, has_params: bool) -> str | None:
    original = p.clone()
    y = module.forward(p)
    if not torch.equal(p, original):  # modifies its input in place (ReLU(inplace=True))
        return None
    if not isinstance(y, torch.Tensor) or y.shape != p.shape:
        return None
    if not torch.equal(y, module.forward(p)):  # nondeterministic
        return None
    bumped = p.clone()
    bumped[..., 0] *= 3.0
    if not torch.equal(module.forward(bumped)[..., 1:], y[..., 1:]):  # couples a row
        return "norm" if _close(module.forward(p * 2.5), y) else None
    if has_params:
        return None
    if _close(module.forward(p * 2.0), y * 2.0) and _close(module.forward(-p), -y):
        return None  # linear (identity, a scaling): saves nothing worth rebuilding
    flipped = module.forward(torch.flip(p, dims=(-1,)))
    return "activation" if torch.equal(flipped, torch.flip(y, dims=(-1,))) else None


# id(module) -> (weak module, role): a module's role is probed once per process, not per
# context (a context is often made anew every step).
_ROLES: dict[int, tuple[weakref.ref, str | None]] = {}


def cached_role(module: nn.Module, x: Any) -> str | None:
    """:func:`role_of` for a module taking one argument, probed at its first call only."""
    key = id(module)
    entry = _ROLES.get(key)
    if entry is not None and entry[0]() is module:
        return entry[1]
    role = role_of(module, x) if single_input(module) else None

    def drop(wr: weakref.ref) -> None:
        if _ROLES.get(key, (None,))[0] is wr:
            del _ROLES[key]

    _ROLES[key] = (weakref.ref(module, drop), role)
    return role


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype, bool]:
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_cache_enabled(),
    )


class ModuleCall:
    """One call of a rebuilt module: its stored input, the autocast state, and the
    (shape, dtype) of each tensor its forward saved, in order."""

    __slots__ = (
        "module",
        "input",
        "requires_grad",
        "autocast",
        "saves",
        "_values",
    )

    def __init__(self, module: nn.Module, input_handle: Handle, x: torch.Tensor) -> None:
        self.module = module
        self.input = input_handle
        self.requires_grad = x.requires_grad
        devices = {"cpu", x.device.type}
        self.autocast = [_autocast_state(d) for d in sorted(devices)]
        self.saves: list[tuple[torch.Size, torch.dtype]] = []
        self._values: dict[int, torch.Tensor] = {}

    def save(self, t: torch.Tensor) -> int:
        """Note a tensor the forward saves; its index in the sequence of saves."""
        self.saves.append((t.shape, t.dtype))
        return len(self.saves) - 1

    def _run(self, x: torch.Tensor) -> Any:
        with _Autocast(self.autocast):
            return self.module.forward(x)

    def output(self, x: torch.Tensor) -> Any:
        """The module's output for input ``x`` (the GEMM input that follows a norm), from
        the same replay that rebuilds its saved tensors: the GEMM's backward asks for it
        just before the module's own backward, so the module runs once in backward."""
        return self._replay(x).detach()

    def value(self, index: int) -> torch.Tensor:
        """The ``index``-th tensor the forward saved, from a replay of the forward."""
        v = self._values.pop(index, None)
        if v is None:
            self._replay()
            v = self._values.pop(index)
        return v

    def _replay(self, x: torch.Tensor | None = None) -> Any:
        captured: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            # Detached, both kept and handed back: the replay's own graph is never run
            # backward, and a saved *output* packed as itself would make a cycle
            # node -> saved tensor -> grad_fn -> node inside autograd's C++ objects, which
            # Python's collector cannot see (the whole replay leaked at every call).
            d = t.detach()
            captured.append(d)
            return d

        x = (self.input.get() if x is None else x).detach().requires_grad_(self.requires_grad)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _identity):
            out = self._run(x)
        got = [(t.shape, t.dtype) for t in captured]
        if got != self.saves:
            raise RuntimeError(
                f"agoq: {type(self.module).__name__} saved {len(self.saves)} tensors for "
                f"backward in its forward but {len(got)} when run again from its stored input "
                f"(or with other shapes/dtypes): {self.saves} vs {got}. Its forward is not a "
                "pure function of its input; exclude it with a KindRule naming it and "
                "ActivationPlan(recompute=False), or report it."
            )
        self._values = dict(enumerate(captured))
        return out


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class _Autocast:
    """Re-enter the autocast state a forward ran under."""

    __slots__ = ("states", "ctxs")

    def __init__(self, states: list[tuple[str, bool, torch.dtype, bool]]) -> None:
        self.states = states
        self.ctxs: list[Any] = []

    def __enter__(self) -> None:
        for device, enabled, dtype, cache in self.states:
            c = torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache)
            c.__enter__()
            self.ctxs.append(c)

    def __exit__(self, *exc: object) -> None:
        while self.ctxs:
            self.ctxs.pop().__exit__(*exc)
