"""Rank functions for test_inputs_compiled_bytes.py (importable by spawned ranks)."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _compiled_model(dim: int, world: int | None, reshard: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(dim), _Block(dim))
    if world is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    for block in model:
        block.compile(backend="aot_eager", fullgraph=True)
    return model


def compiled_bytes_rank(rank: int, world: int) -> dict:
    """FSDP2 + torch.compile: ``compiled_saved_bytes`` right after forward, with
    ``reshard_after_forward`` True (the unsharded parameters freed) and False (kept), and
    the same model without FSDP as the reference."""
    from agoq.memory import compiled_saved_bytes

    dim, batch = 32, 8
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(rank))
    plain = _compiled_model(dim, None, False)
    ref_out = plain(x)
    result = {"plain": compiled_saved_bytes(ref_out, plain)}
    for reshard in (True, False):
        model = _compiled_model(dim, world, reshard)
        out = model(x)
        result[f"reshard={reshard}"] = compiled_saved_bytes(out, model)
        out.sum().backward()  # the count left the graph usable (raises otherwise)
        result[f"grads_finite={reshard}"] = all(
            bool(torch.isfinite(p.grad.full_tensor()).all()) for p in model.parameters()
        )
    return result
