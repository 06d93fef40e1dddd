"""CPU shims for torchtitan 0.2.2: run its trainer on a machine without an accelerator.

Everything torchtitan needs to train on CPU with gloo lives here, and only here: the agoq
converter (:mod:`torchtitan_ext.converter`) contains none of it. Used by the tests and by
``docs/torchtitan.md``; not needed (and not wanted) on GPUs.

Launcher (torchtitan's own ``torchtitan.train.main(Trainer)`` after :func:`apply`)::

    torchrun --standalone --nproc_per_node=2 -m torchtitan_ext.cpu_shims \\
        --job.config_file torchtitan_ext/debug_model.toml ...

What :func:`apply` changes, and why (torchtitan 0.2.2 + torch 2.13 CPU):

1. **Device type.** ``torchtitan.tools.utils`` resolves the device at import time as
   ``torch._utils._get_available_device_type() or "cuda"``; on a CPU-only machine that is
   "cuda" and ``Trainer.__init__`` dies in ``torch.cuda.set_device``. The shim makes the
   probe answer "cpu" *before torchtitan is imported* (several torchtitan modules copy
   ``device_type`` / ``device_module`` by value), so the trainer uses ``torch.cpu`` and
   ``init_distributed`` picks gloo from ``Backend.default_device_backend_map["cpu"]``.
   Raises if torchtitan was already imported with another device.
2. **No device memory monitor.** ``DeviceMemoryMonitor`` calls ``get_device_name``,
   ``get_device_properties``, ``memory_stats``... which ``torch.cpu`` lacks. It is replaced
   by :class:`CPUMemoryMonitor`, which reports the process's peak resident set size
   (``resource.getrusage``), so torchtitan's "memory" column is the CPU RSS peak.
3. **Gloo reductions.** torchtitan calls ``set_gradient_divide_factor(1.0)`` on every FSDP2
   module (its loss is already divided by the global token count), which makes FSDP2
   reduce-scatter with ``ReduceOp.PREMUL_SUM``; gloo rejects PREMUL_SUM (and AVG). The shim
   makes ``FSDPModule.set_gradient_divide_factor`` also call
   ``set_force_sum_reduction_for_comms(True)``: plain SUM on the wire, same result.
4. **Process-group timeouts.** After step 1 ``set_pg_timeouts`` calls
   ``barrier(device_ids=[torch.cpu.current_device()])``, and ``current_device()`` is the
   string "cpu". The shim replaces it with the same function minus ``device_ids``.
5. **Attention with a CPU backward.** llama3's default "sdpa" attention works on CPU. The
   ``*_flex_attn`` / ``*_varlen_attn`` flavors do not (FlexAttention has no CPU backward,
   varlen needs CUDA flash kernels): the shim switches them to "sdpa" (causal mask only,
   so document boundaries are ignored) and logs it.
"""

from __future__ import annotations

import logging
import resource
import sys
from datetime import timedelta
from typing import Any

import torch

_APPLIED: list[str] = []
log = logging.getLogger(__name__)


def _device_type_probe() -> str:
    return "cpu"


class CPUMemoryMonitor:
    """Stand-in for torchtitan's ``DeviceMemoryMonitor``: peak RSS of this process."""

    def __init__(self) -> None:
        import os

        self.device_name = "cpu"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        """RSS peaks cannot be reset: the figure is the peak since the process started."""


def _set_pg_timeouts(timeout: timedelta, parallel_dims) -> None:
    """torchtitan's ``set_pg_timeouts`` without the device-bound barrier."""
    torch.distributed.barrier()
    groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
    for group in groups + [None]:
        torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)


def _patch_fsdp_sum() -> None:
    from torch.distributed.fsdp import FSDPModule

    original = FSDPModule.set_gradient_divide_factor
    if getattr(original, "_agoq_cpu_shim", False):
        return

    def set_gradient_divide_factor(self, factor: float) -> None:
        original(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    set_gradient_divide_factor._agoq_cpu_shim = True  # type: ignore[attr-defined]
    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor  # type: ignore[method-assign]


def _patch_attention() -> None:
    from torchtitan.models.llama3.model.args import TransformerModelArgs

    original = TransformerModelArgs.update_from_config
    if getattr(original, "_agoq_cpu_shim", False):
        return

    def update_from_config(self, job_config, **kwargs):
        if self.attn_type != "sdpa":
            from torchtitan.tools.logging import logger

            logger.warning(
                f"[cpu_shims] attn_type {self.attn_type!r} has no CPU backward: using 'sdpa' "
                "(causal mask only)"
            )
            self.attn_type, self.attn_mask_type = "sdpa", "causal"
        return original(self, job_config, **kwargs)

    update_from_config._agoq_cpu_shim = True  # type: ignore[attr-defined]
    TransformerModelArgs.update_from_config = update_from_config  # type: ignore[method-assign]


def apply_shims(
    applied: list[str], name: str, set_pg_timeouts: Any, patch_attention: Any
) -> list[str]:
    """The shims both torchtitan versions need, with each version's own process-group
    timeout setter and attention patch; records them in ``applied`` (idempotent)."""
    if applied:
        return list(applied)
    tools = sys.modules.get("torchtitan.tools.utils")
    if tools is not None and tools.device_type != "cpu":
        raise RuntimeError(
            f"{name}.apply() must run before torchtitan is imported "
            f"(torchtitan already chose device_type={tools.device_type!r})"
        )
    torch._utils._get_available_device_type = _device_type_probe
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tt_utils

    assert tt_utils.device_type == "cpu", tt_utils.device_type
    metrics.build_device_memory_monitor = CPUMemoryMonitor
    dist_utils.set_pg_timeouts = set_pg_timeouts
    _patch_fsdp_sum()
    patch_attention()
    applied.extend(["device_type=cpu", "cpu_memory_monitor", "set_pg_timeouts", "fsdp_sum", "sdpa"])
    return list(applied)


def apply() -> list[str]:
    """Apply every shim (idempotent); call before anything imports torchtitan.

    Returns the names of the shims applied.
    """
    return apply_shims(_APPLIED, "torchtitan_ext.cpu_shims", _set_pg_timeouts, _patch_attention)


def main() -> None:
    """``python -m torchtitan_ext.cpu_shims <torchtitan args>``: shims, then torchtitan's
    own entry point ``torchtitan.train.main(Trainer)``."""
    apply()
    from torchtitan.train import Trainer
    from torchtitan.train import main as train_main

    train_main(Trainer)


if __name__ == "__main__":
    main()
