"""What agoq stores for HF transformers families built from configs (no hub).

Gradients of these families against the unquantized run are in tests/test_hf.py; here:
which kind each saved tensor gets and that the hand-written HF norms keep nothing of their
own, per-head q/k norms (Qwen3) get their kind, eager attention probabilities are 8-bit,
and HF gradient checkpointing stores every layer's checkpointed input quantized.
"""

from __future__ import annotations

import pytest
import torch

from agoq import ActivationPlan, quantize_activations

transformers = pytest.importorskip("transformers")

# SEQ 64: k_norm's input (2 x 64 x 2 kv heads x 16) reaches min_numel (4096).
HIDDEN, LAYERS, VOCAB, BATCH, SEQ = 64, 2, 128, 2, 64


def _model(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.bfloat16):
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
    }[family]
    extra = {"head_dim": 16} if family in ("qwen3", "gemma") else {}
    cfg = config_cls(
        hidden_size=HIDDEN,
        intermediate_size=176,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        attn_implementation=attn,
        **extra,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).train()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _report(model, plan=None):
    ids = _ids()
    with quantize_activations(plan or ActivationPlan.agoq()) as ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return ctx.report


def _rows(report, prefix: str) -> dict:
    return {k: r for k, r in report.rows.items() if k[0].startswith(prefix)}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_hf_norms_store_only_their_input_and_projections_are_rebuilt(family):
    report = _report(_model(family))
    layer = _rows(report, "model.layers.1.")
    for (fqn, kind), row in layer.items():
        if fqn.endswith(("input_layernorm", "post_attention_layernorm")):
            assert kind == "norm_input"
            assert row.modes.get("kept", 0) == 0, (fqn, row)  # fp32 copies: replayed
            assert row.modes["quantized"] == 1
        if fqn.endswith(("q_proj", "gate_proj", "down_proj")):
            assert row.stored_bytes == 0 and row.modes["recomputed"] == 1, (fqn, row)
    kinds = report.by_kind("model.layers.1.")
    if family == "qwen3":
        qk = kinds["qk_norm_input"]
        assert qk.modes["quantized"] == 2  # q_norm's and k_norm's inputs
        assert 8.0 <= 8 * qk.stored_bytes / (BATCH * SEQ * (4 + 2) * 16) < 8.6  # int8 + scales
    else:
        assert "qk_norm_input" not in kinds


def test_hf_eager_attention_probabilities_are_8_bit():
    report = _report(_model("llama", attn="eager"))
    probs = report.by_kind("model.layers.0.")["attn_probs"]
    # softmax's fp32 output quantized to int8; its bf16 cast (what the matmul saves) is
    # rebuilt from it.
    assert probs.modes["quantized"] == 1 and probs.modes["recomputed"] == 1
    elems = BATCH * 4 * SEQ * SEQ
    assert 8 * probs.stored_bytes / elems < 8.6


def test_hf_gradient_checkpointing_stores_every_layer_input_quantized():
    model = _model("llama", dtype=torch.float32)
    model.gradient_checkpointing_enable()
    report = _report(model)
    # The checkpoint saves each layer's input before the layer's submodules run: layer 0's
    # is the embedding output, the others the previous layer's output (the residual stream).
    saved = {f: (k, r) for (f, k), r in report.rows.items() if f.startswith("model.layers.")}
    assert set(saved) == {f"model.layers.{i}" for i in range(LAYERS)}  # nothing else: GC
    assert saved["model.layers.0"][0] == "embedding_output"
    for i in range(LAYERS):
        kind, row = saved[f"model.layers.{i}"]
        assert kind in ("embedding_output", "norm_input")
        assert row.modes == {"quantized": 1}, (i, row)


def test_hf_explain_names_every_saved_tensor():
    model = _model("qwen3")
    ids = _ids()
    with quantize_activations(ActivationPlan.agoq()) as ctx:
        model(input_ids=ids, labels=ids).loss.backward()
    text = ctx.report.explain()
    assert "model.layers.0.self_attn.q_norm" in text and "qk_norm_input" in text
    assert "int8" in text and "fp4_e2m1" in text and "recomputed" in text
