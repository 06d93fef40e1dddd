"""Small helpers shared by the gradient integrations (DDP hook state, gradient store)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._compat import compiled_original


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP / torch.compile wrappers, so FQNs carry no prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif (inner := compiled_original(model)) is not None:
            model = inner
        else:
            return model


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_state(
    state: Any,
    where: str,
    *,
    version: int,
    required: set[str],
    optional: set[str],
    options: dict[str, Any],
    what: str,
) -> None:
    """Validate the header of a saved state: a mapping with exactly the ``required`` (and
    maybe ``optional``) keys, the format ``version``, and ``options`` equal to ours (value
    and type); raise naming whatever differs."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(state).__name__}")
    missing = sorted(required - set(state))
    if missing:
        raise ValueError(f"{where}: the state lacks {missing} (expected what {what} returns)")
    unknown = sorted(set(state) - required - optional)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}")
    if state["version"] != version:
        raise ValueError(f"{where}: state version {state['version']!r}, this agoq reads {version}")
    opts = state["options"]
    if not isinstance(opts, Mapping) or set(opts) != set(options):
        raise ValueError(f"{where}: 'options' must have the keys {sorted(options)}")
    diffs = [
        f"{k}: saved {opts[k]!r}, this one {v!r}"
        for k, v in options.items()
        if opts[k] != v or type(opts[k]) is not type(v)
    ]
    if diffs:
        raise ValueError(f"{where}: options differ: " + "; ".join(diffs))
