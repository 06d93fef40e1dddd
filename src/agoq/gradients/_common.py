"""Small helpers shared by the gradient integrations (DDP hook state, gradient store)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP / torch.compile wrappers, so FQNs carry no prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
