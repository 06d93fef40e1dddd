"""quantize_activations under FSDP2 (fully_shard), 2 gloo ranks on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_utils import run_ranks


def _fsdp_rank(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from agoq import ActivationPlan, quantize_activations
    from agoq.activations import context as ctx_mod
    from agoq.models.llama import build

    def make():
        torch.manual_seed(0)
        m = build("tiny", dim=64, n_layers=2, vocab_size=128)
        mesh = init_device_mesh("cpu", (world,))
        for layer in m.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 128, (2, 33), generator=g)

    def grads(model, plan):
        model.zero_grad()
        if plan is None:
            loss = F.cross_entropy(
                model(tokens[:, :-1]).reshape(-1, 128), tokens[:, 1:].reshape(-1)
            )
        else:
            with quantize_activations(plan):
                logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, 128), tokens[:, 1:].reshape(-1))
        loss.backward()
        return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}

    seen = []
    real = ctx_mod.quantize
    ctx_mod.quantize = lambda x, spec: seen.append(x) or real(x, spec)
    ref = grads(make(), None)
    got = grads(make(), ActivationPlan.agoq(min_numel=0))
    ctx_mod.quantize = real
    rel = {n: ((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
    from torch import nn

    params_seen = sum(
        isinstance(x, nn.Parameter) or isinstance(x._base, nn.Parameter) for x in seen
    )
    return {"rel": rel, "quantized": len(seen), "params_seen": params_seen}


def test_fsdp2_gradients_and_no_parameter_quantized():
    results = run_ranks(_fsdp_rank, 2, timeout=180)
    for r in results:
        assert r["quantized"] > 0
        assert r["params_seen"] == 0
        assert max(r["rel"].values()) < 0.3, r["rel"]
    # FSDP all-reduces: both ranks hold the same full gradients.
    assert results[0]["rel"] == results[1]["rel"]
