"""`agoq demo`: runs end to end, writes a real PNG and a JSON whose numbers agree."""

from __future__ import annotations

import json
import math
import sys

import pytest

from agoq.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--model", "tiny", "--batch", "4", "--seq", "32"]


def test_demo_writes_png_and_consistent_json(tmp_path, capsys):
    assert main(["demo", "--steps", "3", *FAST, "--out", str(tmp_path)]) == 0
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    data = json.loads((tmp_path / "demo.json").read_text())
    base, q, s = data["baseline"], data["agoq"], data["summary"]
    for r in (base, q):
        assert len(r["losses"]) == 3 and len(r["step_times"]) == 3
        assert all(math.isfinite(x) for x in r["losses"] + [r["eval_loss"]])
        assert r["stored_bytes"] == sum(v["stored"] for v in r["layers"].values())
    assert base["config"]["plan"] == "none" and q["config"]["plan"] == "agoq-norm32"
    # Same seed and data: the first forward is the same computation.
    assert base["losses"][0] == q["losses"][0]
    assert s["unit_bytes"] == 4 * 32 * 64 * 2 == base["unit_bytes"]
    assert s["stored_ratio"] == pytest.approx(q["stored_bytes"] / base["stored_bytes"])
    assert 0 < s["stored_ratio"] < 0.35
    assert s["step_time_ratio"] == pytest.approx(q["median_step_s"] / base["median_step_s"])
    tail_b, tail_q = sum(base["losses"]) / 3, sum(q["losses"]) / 3
    assert s["train_loss"]["rel"] == pytest.approx((tail_q - tail_b) / tail_b)
    assert s["eval_loss"]["agoq"] == q["eval_loss"]
    assert s["wire_bytes_per_step"] == {"baseline": None, "agoq": None}
    out = capsys.readouterr().out
    assert "layers.0" in out and "held-out loss" in out and "median step time" in out
    assert f"{s['stored_ratio']:.3f}x" in out


def test_demo_without_matplotlib_still_prints_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["demo", "--steps", "1", *FAST, "--out", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the console width
    assert "matplotlib is not installed" in out and "agoq[plot]" in out
    assert "median step time" in out
    assert (tmp_path / "demo.json").exists() and not (tmp_path / "demo.png").exists()


def test_demo_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps must be an integer >= 1" in " ".join(capsys.readouterr().err.split())
    assert main(["demo", "--batch", "3", "--world-size", "2", "--out", str(tmp_path)]) == 2
    assert "divisible by world_size" in " ".join(capsys.readouterr().err.split())
    afile = tmp_path / "a-file"
    afile.write_text("")
    assert main(["demo", "--steps", "1", "--model", "tiny", "--out", str(afile)]) == 2
    assert "cannot use --out" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):  # argparse rejects a plan it does not know
        main(["demo", "--plan", "fp4"])


@pytest.mark.slow
def test_demo_two_ranks_int8_reports_wire_bytes(tmp_path):
    args = ["demo", "--steps", "2", *FAST, "--grads", "int8", "--world-size", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "demo.json").read_text())["summary"]
    wire = s["wire_bytes_per_step"]
    # fp32 ring all-reduce over 2 ranks sends the gradient's 4 bytes per parameter once.
    params = json.loads((tmp_path / "demo.json").read_text())["baseline"]["parameters"]
    assert wire["baseline"] == 4 * params
    assert 0.25 < wire["agoq"] / wire["baseline"] < 0.26
