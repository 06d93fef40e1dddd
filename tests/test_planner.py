"""The memory planner against the paper's tables and independent first-principles counts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from agoq.cli import main
from agoq.models import llama
from agoq.planner import (
    COLUMNS,
    MODELS,
    Accounting,
    Layout,
    ModelShape,
    layer_units,
    predict,
)
from agoq.quant import QuantSpec

# The paper's Table 1, per transformer layer, in U.
TABLE_1 = {
    "baseline": dict(zip(COLUMNS, (1, 5, 1, 4, 1, 12, 4), strict=True)),
    "coat": dict(zip(COLUMNS, (1, 5, 1, 1, 0.5, 6, 2), strict=True)),
    "agoq": dict(zip(COLUMNS, (0, 5, 0.25, 0.5, 0, 2, 0), strict=True)),
}
GB, MB = 1e9, 1e6  # the paper prints GB and MB
# The fields of LLaMA3-8B's Hugging Face config.json that the planner reads.
LLAMA3_8B_HF = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}


@pytest.mark.parametrize("method", sorted(TABLE_1))
def test_table_1_exactly(method: str) -> None:
    units = layer_units(MODELS["paper-table-1"], method, 4)
    assert units == TABLE_1[method]
    assert sum(units.values()) == {"baseline": 28, "coat": 16.5, "agoq": 7.75}[method]


@pytest.mark.parametrize("name", ["llama3-8b", "llama2-13b", "codellama-34b", "llama3-70b"])
def test_parameter_count_matches_a_real_model(name: str) -> None:
    # Build the same architecture in torch, at 1/64 width so it fits, and count.
    s = MODELS[name]
    small = replace(s, hidden=s.hidden // 64 * 2, ffn=s.ffn // 32, vocab=s.vocab // 64, layers=2)
    small = replace(small, heads=s.heads // 8, kv_heads=max(1, s.kv_heads // 8))
    cfg = llama.LlamaConfig(
        dim=small.hidden,
        n_layers=small.layers,
        n_heads=small.heads,
        n_kv_heads=small.kv_heads,
        vocab_size=small.vocab,
        hidden_dim=small.ffn,
    )
    model = llama.Llama(cfg)
    assert small.params == sum(p.numel() for p in model.parameters())


def test_published_sizes() -> None:
    # Well-known totals: 8.03B, 13.0B, 33.7B, 70.6B.
    want = {"llama3-8b": 8.03, "llama2-13b": 13.02, "codellama-34b": 33.74, "llama3-70b": 70.55}
    for name, billions in want.items():
        assert MODELS[name].params / 1e9 == pytest.approx(billions, abs=0.01)


def test_memory_arithmetic_from_first_principles() -> None:
    shape = ModelShape("toy", hidden=64, layers=4, heads=4, kv_heads=4, ffn=256, vocab=100)
    acc = Accounting(overhead_gib=0.0)
    layout = Layout(seq=32, mbs=2, tp=2)
    n = (4 * shape.layer_params + 2 * 100 * 64) / 2 + 64  # split by TP; final norm whole
    u = 2 * 32 * 64 * 2 / 2  # one bf16 hidden state, split by sequence parallelism
    logits = 2 * 32 * 100 / 2 * 6
    base = predict(shape, layout, "baseline", accounting=acc)
    assert base.weights == pytest.approx(2 * n)
    assert base.grads == pytest.approx(4 * n)
    assert base.optimizer == pytest.approx(12 * n)
    # 28U per layer (MLP 4x wide, no GQA), plus the final norm input (fp32) and head input.
    assert base.activations == pytest.approx(4 * 28 * u + 3 * u + logits)
    assert base.total == pytest.approx(18 * n + 4 * 28 * u + 3 * u + logits)

    spec = QuantSpec(bits=4, format="fp4_e2m1", block=128)
    agoq = predict(shape, layout, "A+O+G", accounting=acc, activation_spec=spec)
    q = 4.25 / 16  # 4 bits plus one fp32 scale per 128 elements
    assert agoq.activations == pytest.approx(4 * (5 + q + 2 * q + 8 * q) * u + q * u + logits)
    assert agoq.grads == pytest.approx(n * (8 + 16 / 128) / 8)
    assert agoq.optimizer == pytest.approx(n * (4 + 2 + 8 / 2048))
    assert agoq.step_extra == pytest.approx(4 * n)
    assert agoq.total == pytest.approx(
        agoq.weights + agoq.grads + agoq.optimizer + max(agoq.activations, agoq.step_extra)
    )


def test_without_sequence_parallel_norm_inputs_are_replicated() -> None:
    shape = MODELS["llama2-13b"]
    acc = Accounting(overhead_gib=0.0, logits_bytes=0.0)
    sp = predict(shape, Layout(seq=4096, tp=8), "baseline", accounting=acc)
    nosp = predict(
        shape, Layout(seq=4096, tp=8, sequence_parallel=False), "baseline", accounting=acc
    )
    u = 4096 * 5120 * 2
    # QKV input 1U, two fp32 norm inputs 4U and FFN1 input 1U stay whole on every TP rank,
    # and so do the final norm's fp32 input (2U) and the LM head's input (1U).
    assert nosp.activations - sp.activations == pytest.approx((40 * 6 + 3) * u * (1 - 1 / 8))


def test_pipeline_stages_get_dbca_bits_and_the_first_rank_peaks() -> None:
    layout = Layout(seq=8192, tp=8, pp=4, dp=2, schedule="interleaved1f1b", n_microbatches=8)
    assert layout.inflight() == [11, 9, 7, 5]
    pred = predict(MODELS["llama3-70b"], layout, "A+O+G")
    assert pred.bits == (4, 4, 6, 8)
    # DBCA gives the other ranks more bits without raising the busiest rank's peak.
    uniform = predict(MODELS["llama3-70b"], layout, "A+O+G", stage_aware=False)
    assert uniform.total == pytest.approx(pred.total)
    assert pred.rank == uniform.rank == 0


def _close(pred: float, paper: float) -> float:
    return abs(pred / paper - 1)


def test_table_8_llama2_13b_tp8_seq12k() -> None:
    # LLaMA2-13B, TP 8, PP 1, seq 12K, 8 x A6000: Megatron 46.1 GB -> AGoQ (A+O+G) 22.3 GB.
    shape, layout = MODELS["llama2-13b"], Layout(seq=12 * 1024, tp=8)
    assert _close(predict(shape, layout, "baseline").total / GB, 46.1) < 0.10
    assert _close(predict(shape, layout, "A+O+G").total / GB, 22.3) < 0.10
    assert _close(predict(shape, layout, "O").total / GB, 37.7) < 0.10


# Table 14 does not state its layouts; docs/planner.md explains these two.
TABLE_14 = [
    # 32k, 36 layers: the paper's 64-GPU layout (Table 2): TP 8, PP 4, DP 2, interleaved 1F1B.
    (
        36,
        Layout(seq=32768, tp=8, pp=4, dp=2, schedule="interleaved1f1b", n_microbatches=8),
        48606,
        16594,
    ),
    # 64k, 16 layers: one 8-GPU node, TP 8.
    (16, Layout(seq=65536, tp=8), 46681, 19267),
]


@pytest.mark.parametrize(("layers", "layout", "base_mb", "agoq_mb"), TABLE_14)
def test_table_14_llama3_8b_long_sequences(
    layers: int, layout: Layout, base_mb: float, agoq_mb: float
) -> None:
    shape = replace(MODELS["llama3-8b"], layers=layers)
    assert _close(predict(shape, layout, "baseline").total / MB, base_mb) < 0.10
    assert _close(predict(shape, layout, "A+O+G").total / MB, agoq_mb) < 0.10


def test_model_from_hf_config_json(tmp_path) -> None:
    cfg = {**LLAMA3_8B_HF, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    shape = ModelShape.from_json(str(path))
    assert replace(shape, name="llama3-8b") == MODELS["llama3-8b"]
    assert ModelShape.from_json(json.dumps(cfg)).params == MODELS["llama3-8b"].params


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="lacks"):
        ModelShape.from_json('{"hidden": 64}')
    with pytest.raises(ValueError, match="kv_heads"):
        ModelShape("x", 64, 2, 4, 3, 128, 10)
    with pytest.raises(ValueError, match="method"):
        layer_units(MODELS["llama3-8b"], "fp16")
    with pytest.raises(ValueError, match="setup"):
        predict(MODELS["llama3-8b"], Layout(seq=8), "Q")
    with pytest.raises(ValueError, match="tp"):
        Layout(seq=8, tp=0)
    with pytest.raises(ValueError, match="layers cannot fill"):
        predict(
            replace(MODELS["llama3-8b"], layers=4), Layout(seq=8, pp=4, schedule="interleaved1f1b")
        )


def test_cli_json_reproduces_table_1(capsys) -> None:
    assert main(["plan", "--model", "paper-table-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    totals = {m: sum(row.values()) for m, row in out["layer_units"].items()}
    assert totals == {"baseline": 28, "coat": 16.5, "agoq": 7.75}
    mem = out["memory_bytes"]
    assert (
        mem["A+O+G"]["total"] < mem["O+G"]["total"] < mem["O"]["total"] < mem["baseline"]["total"]
    )


def test_cli_table_and_errors(capsys) -> None:
    rc = main(["plan", "--model", "llama2-13b", "--seq", "12288", "--tp", "8", "--units", "GB"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if "A+O+G" in line)
    assert "22.26" in row  # the prediction for the paper's 22.3 GB (Table 8)
    assert main(["plan", "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["plan", "--model", "{not json"]) == 2
    assert main(["plan", "--bits", "7"]) == 2
    assert "bits" in capsys.readouterr().err


def test_v_schedule_puts_embedding_and_head_on_rank_0() -> None:
    # ZBV places stages r and 2p-1-r on rank r: stage 0 and the loss stage share rank 0.
    shape, acc = MODELS["llama3-8b"], Accounting(overhead_gib=0.0)
    layout = Layout(seq=8192, tp=8, pp=4, schedule="zbv")
    assert layout.pipeline().stages == [[0, 7], [1, 6], [2, 5], [3, 4]]
    pred = predict(shape, layout, "baseline", accounting=acc)
    assert pred.rank == 0
    n = 8 * shape.layer_params / 8 + 2 * shape.embedding_params / 8 + shape.hidden
    assert pred.weights == pytest.approx(2 * n)


def test_logits_counted_per_micro_batch_the_loss_stage_holds() -> None:
    shape = replace(MODELS["llama3-8b"], layers=8)
    acc = Accounting(overhead_gib=0.0, logits_bytes=6.0)
    no_logits = replace(acc, logits_bytes=0.0)
    layout = Layout(seq=4096, tp=8, pp=4, schedule="gpipe", n_microbatches=8)
    assert layout.pipeline().last_stage_inflight == 8  # GPipe: all forwards, then backwards
    gap = (
        predict(shape, layout, "baseline", accounting=acc).activations
        - predict(shape, layout, "baseline", accounting=no_logits).activations
    )
    assert gap == pytest.approx(8 * 4096 * shape.vocab / 8 * 6)


def test_no_pipeline_means_one_chunk() -> None:
    shape = MODELS["llama2-13b"]
    plain = predict(shape, Layout(seq=4096, tp=8), "baseline")
    chunked = predict(shape, Layout(seq=4096, tp=8, stages_per_rank=2), "baseline")
    assert chunked.total == plain.total


def test_tensor_parallel_must_divide_heads_and_kv_heads_replicate() -> None:
    with pytest.raises(ValueError, match="tp=3"):
        predict(MODELS["llama3-8b"], Layout(seq=8, tp=3))
    s = MODELS["llama3-8b"]  # 8 K/V heads: with TP 16 each rank keeps one K/V head
    kv = 2 * s.hidden * (s.hidden // s.heads) * s.kv_heads
    assert s.layer_params_per_rank(16) == pytest.approx((s.layer_params - kv) / 16 + kv / 8)
    assert s.layer_params_per_rank(8) == pytest.approx(s.layer_params / 8)


def test_kept_stage_and_odd_bits() -> None:
    acc = Accounting()
    kept = layer_units(MODELS["paper-table-1"], "agoq", 16, acc)
    assert kept["RMSNorm"] == 4  # kept as the baseline stores it: two fp32 inputs
    layout = Layout(seq=4096, tp=8, pp=4, schedule="1f1b", n_microbatches=8)
    spec = QuantSpec(bits=3, format="int", block=128)
    pred = predict(MODELS["llama2-13b"], layout, "A+G", activation_spec=spec)
    assert pred.bits == (3, 4, 6, 8)  # in flight 4/3/2/1: each rank <= 4 x 3 bits


def test_model_names_and_inline_json_are_told_apart() -> None:
    with pytest.raises(ValueError, match="unknown model 'llama3-8B'"):
        ModelShape.from_json("llama3-8B")
    cfg = {**LLAMA3_8B_HF, "architectures": ["LlamaForCausalLM"] * 20}  # a long inline text
    text = json.dumps(cfg)
    assert len(text) > 300
    assert ModelShape.from_json(text).params == MODELS["llama3-8b"].params


@pytest.mark.parametrize(
    "overrides",
    [
        {"norm_bits": True},
        {"overhead_gib": -5.0},
        {"expand_kv": 1.0},
        {"logits_bytes": float("nan")},
        {"adam8_bytes": float("inf")},
    ],
)
def test_accounting_rejects_nonsense(overrides) -> None:
    with pytest.raises(ValueError, match="Accounting"):
        Accounting(**overrides)


def test_docs_planner_table_is_what_the_planner_computes() -> None:
    """docs/planner.md's check against the paper was pasted from the planner: keep it true."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "planner.md").read_text()
    rows = [r for r in doc.splitlines() if r.startswith("| Table ")]
    assert len(rows) == 8
    layouts = {
        "Table 8,": (MODELS["llama2-13b"], Layout(seq=12 * 1024, tp=8), GB, 2**30),
        "(36 layers)": (replace(MODELS["llama3-8b"], layers=36), TABLE_14[0][1], MB, 2**20),
        "(16 layers)": (replace(MODELS["llama3-8b"], layers=16), TABLE_14[1][1], MB, 2**20),
    }
    for row in rows:
        what, setup, paper, planned, err_dec, err_bin = (
            c.strip() for c in row.strip("|").split("|")
        )
        shape, layout, unit, binary = next(v for k, v in layouts.items() if k in what)
        total = predict(shape, layout, setup).total
        ref = float(paper.split()[0].replace(",", ""))
        shown = f"{total / unit:.2f} GB" if unit == GB else f"{total / unit:,.0f} MB"
        assert planned == shown
        assert err_dec == f"{total / unit / ref - 1:+.1%}"
        assert err_bin == f"{total / binary / ref - 1:+.1%}"
