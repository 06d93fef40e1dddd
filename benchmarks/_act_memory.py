"""Memory and step helpers shared by the activation benchmarks (activation_width.py,
alternatives.py): one way of measuring memory for every method compared.

Memory is read from the process itself (Linux ``/proc``), so it counts whatever a method
keeps, in whatever form (agoq's packed bytes, a checkpoint's inputs, inductor's fp8 copies,
save_on_cpu's host copies): **held** = resident bytes after the forward (graph alive)
minus before it; **peak** = the step's high-water mark (``VmHWM``, reset before the step)
minus the resident bytes before it. It runs in a child process whose glibc malloc maps
every block of 4 KiB or more with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor
leaves the resident set at once and the differences are exact to a page (on the reference
model they match agoq's own byte count within 2%). The child only measures memory: that
malloc setting slows small allocations, so step times come from the parent process.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

CHILD_FLAG = "--memory-child"


class SavedCounter:
    """Independent of agoq: bytes of distinct non-parameter tensors autograd saves."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: dict[int, torch.Tensor] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter) and id(base) not in self._seen:
            self._seen[id(base)] = base  # holding it is what autograd does anyway
            self.bytes += base.numel() * base.element_size()
        return t


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script --memory-child ARGS`` with malloc pinned to mmap; its last stdout line
    is a JSON object, returned."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"}
    proc = subprocess.run(
        [sys.executable, script, CHILD_FLAG, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_output(result: dict) -> None:
    """Print the child's result as its last stdout line."""
    print(json.dumps(result), flush=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_step(forward: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(held, peak) bytes of one step: ``forward()`` returns the loss, then backward."""
    gc.collect()
    before = _rss()
    _reset_peak()
    loss = forward()
    held = _rss() - before
    loss.backward()
    peak = _peak() - before
    del loss
    gc.collect()
    return held, peak


def mib(nbytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{nbytes / 2**20:.1f}"


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios a[i] / b[i]: each round runs both back to
    back, so the ratio of a round cancels the machine's slower drift."""
    r = sorted(x / y for x, y in zip(a, b, strict=True))
    if len(r) < 4:
        return statistics.median(r), r[0], r[-1]
    q = statistics.quantiles(r, n=4)
    return statistics.median(r), q[0], q[2]
