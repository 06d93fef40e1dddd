"""quantize_activations under tensor + sequence parallel (parallelize_module, 2 gloo ranks).

agoq's reference LLaMA is parallelized the way torchtitan parallelizes its llama (colwise
Q/K/V and gate/up, rowwise out/down projections, sequence-parallel norms, a rowwise
embedding with a sequence-sharded output). Gradients are compared against the same TP
model without agoq (and that one against the unparallelized model), with the bound
tests/test_activations.py asserts without TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_utils import run_ranks

VOCAB, DIM, BATCH, SEQ = 256, 64, 2, 32  # the model sees SEQ tokens (SEQ + 1 drawn)


def _model():
    from agoq.models.llama import build

    torch.manual_seed(0)
    return build("tiny", dim=DIM, n_layers=2, vocab_size=VOCAB)


def _tensor_parallel(model, mesh):
    """torchtitan's llama TP plan (loss on replicated logits), on agoq's llama."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(
        model,
        mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    for layer in model.layers.values():
        parallelize_module(
            layer,
            mesh,
            {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None),
                    desired_input_layouts=(Replicate(), None, None),
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            },
        )
        # The model's views use its head counts: each rank now holds a share of the heads.
        layer.attention.n_heads //= mesh.size()
        layer.attention.n_kv_heads //= mesh.size()
    return model


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    if hasattr(logits, "full_tensor"):  # a DTensor
        logits = logits.full_tensor()
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _grads(model, tokens, plan=None):
    """Full (gathered) fp32 gradients, and the context's report (None without plan)."""
    import agoq

    model.zero_grad(set_to_none=True)
    ctx = None
    if plan is None:
        _loss(model, tokens).backward()
    else:
        with agoq.quantize_activations(plan) as ctx:
            loss = _loss(model, tokens)
        loss.backward()
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out, ctx


def _rel(a: dict, b: dict) -> dict:
    return {
        n: ((a[n].float() - b[n].float()).norm() / b[n].float().norm().clamp_min(1e-30)).item()
        for n in b
    }


def _tp_rank(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from agoq import ActivationPlan

    mesh = init_device_mesh("cpu", (world,))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    plain = _model()
    dense_ref, _ = _grads(plain, tokens)
    model = _tensor_parallel(_model(), mesh)
    assert isinstance(model.layers["0"].attention.wq.weight, DTensor)
    ref, _ = _grads(model, tokens)
    kept, kctx = _grads(model, tokens, ActivationPlan.keep_all())
    got, ctx = _grads(model, tokens, ActivationPlan.agoq(min_numel=0))
    report = ctx.report
    kinds = {
        k: {
            "tensors": r.tensors,
            "original": r.original_bytes,
            "stored": r.stored_bytes,
            "modes": dict(r.modes),
        }
        for k, r in report.by_kind().items()
    }

    # Autocast: the bf16 copies of the DTensor weights are kept (never quantized), once each.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ac_ref, _ = _grads(model, tokens)
        ac_got, ac_ctx = _grads(model, tokens, ActivationPlan.agoq(min_numel=0))
    weight_copies = {
        fqn: (dict(r.modes), r.stored_bytes)
        for (fqn, kind), r in ac_ctx.report.rows.items()
        if kind == "attn_proj_input"
    }

    # In-place change of a saved DTensor after the save: agoq's version check raises.
    inplace_error = ""
    from agoq import quantize_activations

    h = torch.randn(BATCH, SEQ // world, DIM, requires_grad=True)
    from torch.distributed.tensor import Shard

    with quantize_activations(ActivationPlan.agoq(min_numel=0)):
        hd = DTensor.from_local(h * 1.0, mesh, [Shard(1)], run_check=False)
        y = (hd * hd).sum()
        with torch.no_grad():
            hd.mul_(2)
    try:
        y.full_tensor().backward()
    except RuntimeError as e:
        inplace_error = str(e)

    return {
        "tp_vs_dense": max(_rel(ref, dense_ref).values()),
        "keep_all_equal": all(torch.equal(kept[n], ref[n]) for n in ref),
        "keep_all_bytes": (kctx.report.stored_bytes, kctx.report.original_bytes),
        "rel": _rel(got, ref),
        "kinds": kinds,
        "stored": report.stored_bytes,
        "original": report.original_bytes,
        "inplace_error": inplace_error,
        "autocast_rel": max(_rel(ac_got, ac_ref).values()),
        "weight_copies": weight_copies,
    }


def test_tp_sequence_parallel_activations():
    results = run_ranks(_tp_rank, 2, timeout=150)
    local_tokens = BATCH * SEQ // 2  # a sequence-parallel activation's rows on one rank
    for r in results:
        # The reference itself: TP without agoq matches the unparallelized model.
        assert r["tp_vs_dense"] < 1e-4, r["tp_vs_dense"]
        assert r["keep_all_equal"]
        stored, original = r["keep_all_bytes"]
        assert stored == original > 0
        rel = r["rel"]
        # The bound of the non-TP test (tests/test_activations.py).
        assert max(rel.values()) < 0.3, rel
        assert sum(rel.values()) / len(rel) < 0.12, rel
        kinds = r["kinds"]
        # The saves really got quantized, and the bytes are this rank's shard: a
        # sequence-parallel norm input holds BATCH * SEQ / 2 rows of DIM fp32 values, in
        # 4-bit codes plus one fp32 scale per 128 elements.
        n = local_tokens * DIM
        norm = kinds["norm_input"]
        assert norm["modes"] == {"quantized": 5} and norm["tensors"] == 5, norm  # 2 x 2 + 1
        assert norm["original"] == 5 * n * 4, norm
        assert norm["stored"] == 5 * (n // 2 + n // 128 * 4), norm
        # The projections' inputs are the all-gathered (full-sequence) norm outputs: they
        # have no recipe under sequence parallel and are stored in the fallback spec.
        proj = kinds["attn_proj_input"]
        assert proj["modes"] == {"quantized": 2, "dedup": 4}, proj  # wq stores, wk/wv reuse
        assert proj["original"] == 2 * 2 * n * 4, proj
        assert kinds["swiglu_input"]["modes"]["quantized"] == 4
        # The down projection's input (the SwiGLU product, passed through from_local) is
        # rebuilt from its recipe, as without TP.
        down = kinds["mlp_down_input"]
        assert down["stored"] == 0 and down["modes"] == {"recomputed": 2}, down
        attn = kinds["attn_internals"]
        assert attn["stored"] == attn["original"] > 0 and attn["modes"] == {"kept": 10}
        assert r["stored"] < 0.5 * r["original"], (r["stored"], r["original"])
        assert "modified by an inplace operation" in r["inplace_error"], r["inplace_error"]
        # Autocast: the bound of the non-TP autocast test; each Q/K/V Linear keeps its bf16
        # weight copy (this rank's rows x DIM x 2 bytes) and quantizes its bf16 input cast
        # (the full sequence after the all-gather: 4 bits + an fp32 scale per 128).
        assert r["autocast_rel"] < 0.35, r["autocast_rel"]
        n_full = BATCH * SEQ * DIM
        out_rows = {"wq": 64, "wk": 32, "wv": 32}  # n_heads / n_kv_heads x head_dim 16
        assert len(r["weight_copies"]) == 2 * 3  # 2 layers x Q/K/V
        for fqn, (modes, stored) in r["weight_copies"].items():
            assert modes == {"kept": 1, "quantized": 1}, (fqn, modes)
            rows = out_rows[fqn.rsplit(".", 1)[1]] // 2
            assert stored == rows * DIM * 2 + n_full // 2 + n_full // 128 * 4, (fqn, stored)


def _dtensor_norm_rank(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from agoq import ActivationPlan, quantize_activations

    mesh = init_device_mesh("cpu", (world,))
    norm = torch.nn.RMSNorm(DIM)
    norm.weight = torch.nn.Parameter(distribute_tensor(norm.weight.data, mesh, [Replicate()]))
    x = DTensor.from_local(torch.randn(BATCH, 8, DIM), mesh, [Shard(1)], run_check=False)
    with quantize_activations(ActivationPlan.agoq()) as ctx:
        y = norm(x)
    y.sum().backward()
    return {"modes": dict(ctx.report.total().modes)}


def test_dtensor_input_module_is_never_replayed():
    """A module fed a DTensor is not replayed (its forward may run collectives; a replay on
    one rank only would hang): its saves are stored by kind, and backward completes."""
    results = run_ranks(_dtensor_norm_rank, 2, timeout=60)
    for r in results:
        assert r["modes"].get("recomputed", 0) == 0, r
