"""Tests spawn gloo ranks with agoq's own helper."""

from agoq.spawn import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
