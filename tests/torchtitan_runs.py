"""Run torchtitan's own entry point under torchrun on CPU/gloo and read its log (both
torchtitan versions' tests use this).

Every run has a timeout; when it runs out the whole process group (torchrun and its ranks)
is killed and the test fails with the log's tail.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 200  # seconds per torchrun; a healthy run takes ~15-40 s on 2 cores

_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*(-?[\d.]+|nan|inf)\s+grad_norm:\s*([\d.]+|nan|inf)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def require_torchtitan(series: str) -> object:
    """The installed torchtitan module, or skip (the whole module when called at import)
    unless its version starts with ``series`` ("0.2." or "0.3.")."""
    pytest.importorskip("triton", reason="torchtitan imports triton unconditionally")
    torchtitan = pytest.importorskip("torchtitan")
    if not torchtitan.__version__.startswith(series):
        pytest.skip(
            f"needs torchtitan {series}x; torchtitan {torchtitan.__version__} is installed",
            allow_module_level=True,
        )
    return torchtitan


def torchrun(
    args: list[str], *, nproc: int, cwd: Path, env: dict[str, str] | None = None, name: str
) -> subprocess.Popen:
    """Start ``python -m torch.distributed.run --standalone`` with ``args`` (non-blocking:
    :func:`finish` waits), offline, one intra-op thread per rank, this repository on the
    path."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", *args,
    ]  # fmt: skip
    full_env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(cwd / f"hf_cache_{name}"),
        HF_HOME=str(cwd / f"hf_home_{name}"),
        **(env or {}),
    )
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    proc.agoq_name = name  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, steps: int) -> tuple[list[float], str]:
    """Wait for a :func:`torchrun`; returns (loss per step, log). Non-last pipeline stages
    print -1 as their loss: the first real value of each step is kept."""
    name = getattr(proc, "agoq_name", "run")
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        log, _ = proc.communicate()
        pytest.fail(f"torchrun {name} timed out after {RUN_TIMEOUT}s:\n{log[-4000:]}")
    log = _ANSI.sub("", log)
    assert proc.returncode == 0, f"torchrun {name} failed:\n{log[-6000:]}"
    losses: dict[int, float] = {}
    for m in _STEP.finditer(log):
        loss = float(m.group(2))
        if loss != -1.0:
            losses.setdefault(int(m.group(1)), loss)
    assert sorted(losses) == list(range(1, steps + 1)), log[-4000:]
    return [losses[s] for s in range(1, steps + 1)], log


def check_curves(on: list[float], off: list[float], *, fall: float = 0.3) -> None:
    """Both finite, both fall by ``fall``, same first loss, within 0.05 of each other."""
    for curve in (on, off):
        assert all(math.isfinite(x) for x in curve), curve
        assert curve[-1] < curve[0] - fall, curve  # the loss falls
    assert on[0] == pytest.approx(off[0], abs=0.01)  # same data, same init
    diff = max(abs(a - b) for a, b in zip(on, off, strict=True))
    assert diff < 0.05, (on, off)


def report(log: str) -> tuple[float, float]:
    """(stored MiB, original MiB) of part 0's step-1 activation report."""
    m = re.search(r"\[agoq\] step 1 part 0: activations stored ([\d.]+) MiB of ([\d.]+) MiB", log)
    assert m, "no agoq memory report in the log"
    return float(m.group(1)), float(m.group(2))
