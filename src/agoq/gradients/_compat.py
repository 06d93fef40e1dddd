"""The private torch APIs the gradient package touches, in one place, each with a fallback
or a clear error (torch 2.13 is what they were written against)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist


def functional_collectives() -> ModuleType:
    """``torch.distributed._functional_collectives`` (traceable collectives for compile)."""
    import torch.distributed._functional_collectives as fcol

    return fcol


def group_timeout(group: dist.ProcessGroup, device: torch.device) -> datetime.timedelta | None:
    """The timeout ``group`` was created with (None when torch does not expose it; the
    caller then uses torch's default for the backend)."""
    try:
        backend = group._get_backend(device)
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, TypeError):
        return None
    return timeout if isinstance(timeout, datetime.timedelta) else None


def queue_backward_callback(fn: Callable[[], None]) -> bool:
    """Run ``fn`` on the autograd thread when the current backward pass has finished its
    graph (before DDP's own finalize callback, when queued earlier). False when not inside
    a backward pass or when this torch has no such hook."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if engine is None or not hasattr(engine, "queue_callback"):
        return False
    try:
        engine.queue_callback(fn)
    except RuntimeError:  # "Final callbacks can only be installed during backward pass"
        return False
    return True


def work_from_future(fut: torch.futures.Future) -> dist.Work:
    """A ``dist.Work`` that completes with ``fut`` (for callers that wait on Work)."""
    return torch._C._distributed_c10d._create_work_from_future(fut)


__all__ = [
    "functional_collectives",
    "group_timeout",
    "queue_backward_callback",
    "work_from_future",
]
