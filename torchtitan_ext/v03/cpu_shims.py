"""CPU shims for torchtitan 0.3.0: run its trainer on a machine without an accelerator.

Everything torchtitan 0.3 needs to train on CPU with gloo lives here, and only here: the agoq
converter (:mod:`torchtitan_ext.v03.converter`) contains none of it. Used by the tests and
``docs/torchtitan.md``; not needed (and not wanted) on GPUs.

Launcher (torchtitan's own ``torchtitan.train.main()`` after :func:`apply`)::

    torchrun --standalone --nproc_per_node=2 -m torchtitan_ext.v03.cpu_shims \\
        --module torchtitan_ext.v03.recipes --config llama3_debugmodel_agoq ...

What :func:`apply` changes, and why (torchtitan 0.3.0 + torch 2.14 on a CPU-only machine):

1. **Device type.** ``torchtitan.tools.utils`` resolves the device at import time as
   ``torch._utils._get_available_device_type() or "cuda"``: "cuda" without a GPU, and
   ``Trainer.__init__`` dies in ``torch.cuda.set_device``. The probe answers "cpu" *before
   torchtitan is imported* (its modules copy ``device_type`` / ``device_module`` by value);
   ``init_distributed`` then picks gloo. Raises if torchtitan already chose another device.
2. **No device memory monitor.** ``DeviceMemoryMonitor`` calls CUDA-only ``torch.cpu``
   functions; it is replaced by a monitor of the process's peak resident set size.
3. **Gloo reductions.** torchtitan sets ``set_gradient_divide_factor(1.0)`` on every FSDP2
   module, so FSDP2 reduces with ``ReduceOp.PREMUL_SUM``, which gloo rejects: the shim also
   calls ``set_force_sum_reduction_for_comms(True)`` (plain SUM, same result).
4. **Process-group timeouts.** ``set_pg_timeouts`` calls ``barrier(device_ids=[
   torch.cpu.current_device()])`` and ``current_device()`` is the string "cpu": replaced by
   the same function without ``device_ids``.
5. **Attention with a CPU backward.** llama3's default FlexAttention has no CPU backward
   (varlen needs CUDA kernels): every ``inner_attention`` of the model config becomes
   ``ScaledDotProductAttention`` (causal; document boundaries are ignored), logged.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

# Version-independent pieces, shared with the 0.2.2 shims (that module imports only torch).
from ..cpu_shims import apply_shims

_APPLIED: list[str] = []


def _set_pg_timeouts(timeout: timedelta, parallel_dims: Any) -> None:
    """torchtitan's ``set_pg_timeouts`` without the device-bound barrier."""
    torch.distributed.barrier()
    groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
    for group in [*groups, None]:
        torch.distributed.set_timeout(timeout, group)


def sdpa_attention(model_config: Any) -> int:
    """Make every ``inner_attention`` of ``model_config`` SDPA (causal); returns how many
    were changed."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.protocols.module import Module

    changed = 0
    for _fqn, cfg, _parent, _attr in model_config.traverse(Module.Config, recurse=True):
        inner = getattr(cfg, "inner_attention", None)
        if inner is not None and not isinstance(inner, ScaledDotProductAttention.Config):
            cfg.inner_attention = ScaledDotProductAttention.Config()
            changed += 1
    return changed


def _patch_attention() -> None:
    from torchtitan.trainer import Trainer

    original = Trainer.__init__
    if getattr(original, "_agoq_cpu_shim", False):
        return

    def __init__(self: Any, config: Any) -> None:
        n = sdpa_attention(config.model_spec.model)
        if n:
            from torchtitan.tools.logging import logger

            logger.warning(
                f"[cpu_shims] {n} attention modules have no CPU backward: using SDPA "
                "(causal mask only)"
            )
        original(self, config)

    __init__._agoq_cpu_shim = True  # type: ignore[attr-defined]
    Trainer.__init__ = __init__  # type: ignore[method-assign]


def apply() -> list[str]:
    """Apply every shim (idempotent); call before anything imports torchtitan.

    Returns the names of the shims applied.
    """
    return apply_shims(_APPLIED, "torchtitan_ext.v03.cpu_shims", _set_pg_timeouts, _patch_attention)


def main() -> None:
    """``python -m torchtitan_ext.v03.cpu_shims <torchtitan args>``: the shims, then
    torchtitan's own entry point ``torchtitan.train.main()``."""
    apply()
    from torchtitan.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
