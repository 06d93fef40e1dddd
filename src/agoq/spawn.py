"""Run a function on spawned gloo ranks on 127.0.0.1, each with a timeout: never hang.

Used by agoq's tests and benchmarks (and handy for trying agoq's collectives locally).
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

# What the fork server imports once, so that each rank starts without importing torch and
# agoq again (~3-4 s of CPU per rank on a 2-core machine; most of a short test's time).
_PRELOAD = ["torch", "torch.distributed", "agoq"]


def context() -> Any:
    """The multiprocessing context ranks start from: ``forkserver`` (a clean server process
    that imported torch and agoq once forks each rank) where the platform has it, else
    ``spawn``. Never ``fork``: the caller may have started threads (OpenMP, gloo)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
        return ctx
    return mp.get_context("spawn")


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world, port, timeout, queue, args, env):
    import datetime

    import torch
    import torch.distributed as dist

    # A fork-server child starts with the server's environment (from when it started): give
    # it the caller's, as spawn would. Modules the server preloaded read theirs at import.
    os.environ.clear()
    os.environ.update(env)
    faulthandler.dump_traceback_later(timeout, exit=True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        result = fn(rank, world, *args)
        # Tensors sent through a multiprocessing queue are shared-memory handles that die
        # with this process: send plain bytes instead.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report every failure to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo ranks (new processes, from
    :func:`context`); return their results. ``fn`` and ``args`` must be picklable.

    Raises AssertionError with the failing ranks' tracebacks, or when a rank does not finish
    within ``timeout`` seconds (all ranks are then killed).
    """
    ctx = context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world, port, timeout, queue, args, dict(os.environ)),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout + 30
    while len(results) + len(errors) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, payload = queue.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        if status == "ok":
            import torch

            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    reported = {int(e.split(":", 1)[0].removeprefix("rank ")) for e in errors}
    silent = sorted(set(range(world)) - set(results) - reported)
    if silent:
        codes = [p.exitcode for p in procs]
        if time.monotonic() < deadline:  # they died without reporting, e.g. killed
            errors.insert(0, f"ranks {silent} exited without a result (exit codes {codes})")
        else:
            errors.insert(
                0, f"ranks {silent} did not finish within {timeout}s (exit codes {codes})"
            )
    if errors:
        raise AssertionError("\n".join(errors))
    sys.stdout.flush()
    return [results[r] for r in range(world)]
