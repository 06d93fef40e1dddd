"""``agoq explain``: one line per module and kind, with modes, formats and bytes."""

from __future__ import annotations

import pytest

from agoq.cli import main


def test_explain_reference_model(capsys):
    assert main(["explain", "--layers", "1", "--hidden", "64", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert (
        "norm_input" in lines["layers.0.ffn_norm"] and "fp4_e2m1/128" in lines["layers.0.ffn_norm"]
    )
    assert (
        "recomputed" in lines["layers.0.attention.wq"] and "0.00U" in lines["layers.0.attention.wq"]
    )
    assert "kept" in lines["layers.0.attention"]


def test_explain_rejects_bad_sizes(capsys):
    assert main(["explain", "--seq", "0"]) == 2
    assert "--seq must be >= 1" in capsys.readouterr().err


def test_explain_hf_family(capsys):
    pytest.importorskip("transformers")
    argv = [
        "explain",
        "--hf",
        "qwen3",
        "--hidden",
        "64",
        "--seq",
        "64",
        "--prefix",
        "model.layers.0",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_norm" in out and "qk_norm_input" in out
