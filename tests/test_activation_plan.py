"""ActivationPlan: kind resolution for known model families, config parsing, presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agoq import ActivationPlan, KindRule, QuantSpec
from agoq.activations.plan import KINDS

PLAN = ActivationPlan.agoq()
LIN = nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("fqn", "module", "kind"),
    [
        # agoq's reference model and torchtitan llama3 0.2.x
        ("layers.3.attention_norm", nn.RMSNorm(4), "norm_input"),
        ("layers.3.ffn_norm", nn.RMSNorm(4), "norm_input"),
        ("norm", nn.RMSNorm(4), "norm_input"),
        ("layers.3.attention.wq", LIN, "attn_proj_input"),
        ("layers.3.attention.wk", LIN, "attn_proj_input"),
        ("layers.3.attention.wv", LIN, "attn_proj_input"),
        ("layers.3.attention.wo", LIN, "attn_out_input"),
        ("layers.3.attention", nn.Module(), "attn_internals"),
        ("layers.3.attention.sdpa", nn.Module(), "attn_internals"),
        ("layers.3.feed_forward.w1", LIN, "mlp_up_input"),
        ("layers.3.feed_forward.w3", LIN, "mlp_up_input"),
        ("layers.3.feed_forward.w2", LIN, "mlp_down_input"),
        ("layers.3.feed_forward", nn.Module(), "swiglu_input"),
        ("output", LIN, "lm_head_input"),
        # torchtitan 0.3.x fused QKV
        ("layers.0.attention.qkv_linear.wqkv", LIN, "attn_proj_input"),
        # wrapped by DDP / FSDP / compile
        ("module.layers.0.attention.wq", LIN, "attn_proj_input"),
        ("_orig_mod.layers.0.feed_forward.w2", LIN, "mlp_down_input"),
        # HuggingFace Llama
        ("model.layers.5.input_layernorm", nn.Module(), "norm_input"),
        ("model.layers.5.post_attention_layernorm", nn.Module(), "norm_input"),
        ("model.layers.5.self_attn.q_proj", LIN, "attn_proj_input"),
        ("model.layers.5.self_attn.k_proj", LIN, "attn_proj_input"),
        ("model.layers.5.self_attn.v_proj", LIN, "attn_proj_input"),
        ("model.layers.5.self_attn.o_proj", LIN, "attn_out_input"),
        ("model.layers.5.self_attn", nn.Module(), "attn_internals"),
        ("model.layers.5.mlp.gate_proj", LIN, "mlp_up_input"),
        ("model.layers.5.mlp.up_proj", LIN, "mlp_up_input"),
        ("model.layers.5.mlp.down_proj", LIN, "mlp_down_input"),
        ("model.layers.5.mlp", nn.Module(), "swiglu_input"),
        ("model.norm", nn.Module(), "norm_input"),
        ("lm_head", LIN, "lm_head_input"),
        # not model parts
        ("layers.3", nn.Module(), None),
        ("", nn.Module(), None),
        ("layers.3.attention.wq_extra", LIN, None),
    ],
)
def test_default_kinds(fqn, module, kind):
    assert PLAN.kind_of(fqn, module) == kind


def test_norm_classes_match_anywhere_and_embeddings_are_producers():
    assert PLAN.kind_of("blocks.2.my_norm_x", nn.LayerNorm(4)) == "norm_input"
    assert PLAN.kind_of("tok_embeddings", nn.Embedding(3, 4)) is None
    assert PLAN.producer_kind("tok_embeddings", nn.Embedding(3, 4)) == "embedding_output"
    assert PLAN.producer_kind("model.embed_tokens", nn.Embedding(3, 4)) == "embedding_output"


def test_user_rules_come_first():
    plan = ActivationPlan.agoq(rules=(KindRule("attn_internals", r"\.mixer$"),))
    assert plan.kind_of("blocks.0.mixer", nn.Module()) == "attn_internals"
    assert plan.kind_of("layers.0.attention.wq", LIN) == "attn_proj_input"
    with pytest.raises(ValueError, match="kind"):
        KindRule("no_such_kind", "x")
    with pytest.raises(ValueError, match="pattern or classes"):
        KindRule("other")


def test_agoq_preset_matches_the_paper():
    p = ActivationPlan.agoq()
    four = QuantSpec(bits=4, format="fp4_e2m1", block=128)
    for k in ("norm_input", "swiglu_input", "attn_out_input"):
        assert p.action(k) == four
    assert p.action("attn_internals") == "keep"
    for k in ("attn_proj_input", "mlp_up_input", "mlp_down_input", "lm_head_input"):
        assert p.action(k) == "recompute"
    assert p.recompute and p.fallback == four
    assert set(p.describe().split("\n")[0].split()[:1]) <= set(KINDS)


def test_agoq_norm_spec_changes_only_the_residual_stream():
    fine = QuantSpec(bits=4, format="fp4_e2m1", block=32, scale_dtype=torch.bfloat16)
    paper, plan = ActivationPlan.agoq(), ActivationPlan.agoq(norm_spec=fine)
    assert plan.action("norm_input") == plan.action("embedding_output") == fine
    changed = {k for k in KINDS if plan.action(k) != paper.action(k)}
    assert changed == {"norm_input", "embedding_output"}
    assert fine.bits_per_element == 4.5  # vs 4.25 for the paper's block 128 / fp32 scales


def test_from_dict_full_and_errors():
    plan = ActivationPlan.from_dict(
        {
            "preset": "agoq",
            "bits": 4,
            "format": "int",
            "block": 64,
            "scale_dtype": "bfloat16",
            "kinds": {"attn_internals": 8, "swiglu_input": {"bits": 6}, "norm_input": 16},
            "rules": [{"kind": "norm_input", "pattern": "custom_norm$"}],
            "min_numel": 10,
            "recompute": False,
            "compiled": 8,
        }
    )
    assert plan.action("attn_internals") == QuantSpec(8, "int", 64, scale_dtype=torch.bfloat16)
    assert plan.action("swiglu_input") == QuantSpec(6, "int", 64, scale_dtype=torch.bfloat16)
    assert plan.action("norm_input") == "keep"
    assert plan.action("attn_out_input") == QuantSpec(4, "int", 64, scale_dtype=torch.bfloat16)
    assert plan.kind_of("x.custom_norm", nn.Module()) == "norm_input"
    assert plan.min_numel == 10 and plan.recompute is False
    assert plan.compiled == QuantSpec(8, "int", 64, scale_dtype=torch.bfloat16)
    for bad, msg in [
        ({"bitz": 4}, "unknown key"),
        ({"kinds": {"attn": 4}}, "unknown kind 'attn'"),
        ({"kinds": {"norm_input": 7}}, "bits"),
        ({"kinds": {"norm_input": {"bits": 4, "colour": 1}}}, "unknown key"),
        ({"preset": "fancy"}, "preset"),
        ({"rules": [{"kind": "norm_input", "regex": "x"}]}, "unknown key"),
        ({"recompute": "yes"}, "recompute"),
        ({"fallback": "recompute"}, "fallback"),
        ({"scale_dtype": "float16"}, "scale_dtype"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ActivationPlan.from_dict(bad)


def test_from_toml_text_and_file(tmp_path):
    text = """
[agoq.activations]
preset = "uniform"
bits = 8
format = "int"
[agoq.activations.kinds]
attn_internals = "keep"
"""
    plan = ActivationPlan.from_toml(text, table="agoq.activations")
    assert plan.action("norm_input") == QuantSpec(8, "int", 128)
    assert plan.action("attn_internals") == "keep"
    f = tmp_path / "plan.toml"
    f.write_text(text)
    assert ActivationPlan.from_toml(str(f), table="agoq.activations") == plan
    with pytest.raises(ValueError, match="no \\[agoq.missing\\]"):
        ActivationPlan.from_toml(text, table="agoq.missing")


def test_with_bits_moves_only_base_specs():
    p = ActivationPlan.agoq().with_bits(4, 6)
    assert p.action("norm_input") == QuantSpec(6, "int", 128)
    assert p.fallback == QuantSpec(6, "int", 128)
    assert p.action("attn_internals") == "keep"
    assert ActivationPlan.agoq().with_bits(4, 16).action("norm_input") == "keep"
    assert ActivationPlan.agoq().with_bits(4, 8).action("swiglu_input") == QuantSpec(8, "int", 128)


def test_invalid_plan_fields():
    with pytest.raises(ValueError, match="unknown kind"):
        ActivationPlan(kinds={"nope": "keep"})
    with pytest.raises(ValueError, match="invalid action"):
        ActivationPlan(kinds={"other": "drop"})
    with pytest.raises(ValueError, match="min_numel"):
        ActivationPlan(min_numel=-1)


def test_for_stage_follows_the_real_schedule():
    plan = ActivationPlan.agoq()
    # 1F1B, 4 ranks: in flight 4, 3, 2, 1 -> bits 4, 5, 8, 16.
    got = [plan.for_stage(i, 4, "1f1b", n_microbatches=8) for i in range(4)]
    assert got[0] == plan
    assert got[1].action("norm_input") == QuantSpec(5, "int", 128)
    assert got[2].action("norm_input") == QuantSpec(8, "int", 128)
    assert got[3].action("norm_input") == "keep"
    # The paper's setting: interleaved 1F1B, 4 ranks, 2 chunks, 8 micro-batches (11/9/7/5).
    from torch.distributed.pipelining import ScheduleInterleaved1F1B

    bits = [
        plan.for_stage(i, 4, ScheduleInterleaved1F1B, n_microbatches=8, stages_per_rank=2).action(
            "swiglu_input"
        )
        for i in range(4)
    ]
    assert [b.bits for b in bits] == [4, 4, 6, 8]
    # GPipe holds the same on every rank: nothing changes.
    assert all(plan.for_stage(i, 4, "gpipe", n_microbatches=8) == plan for i in range(4))
    with pytest.raises(ValueError, match="out of range"):
        plan.for_stage(4, 4)
