"""User errors of the ``agoq`` command end in ONE line on stderr and exit code 2, never a
traceback, and are found before any work starts (issue 10, class 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agoq.cli import main

FAST = ["--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "1"]


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # rich used to wrap long messages at 80 columns
    assert "Traceback" not in err
    assert lines[0].startswith(f"agoq {argv[0]}: "), err
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail at once if ``agoq demo`` starts training: its errors must come first."""
    import agoq.cli.demo as demo

    def refuse(*args, **kwargs):
        raise AssertionError("agoq demo started training before checking its options")

    monkeypatch.setattr(demo, "train", refuse)


# ------------------------------------------------------------------------------ demo


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (an unwritable folder)")
def test_demo_unwritable_out_is_found_before_training(capsys, no_training):
    # /proc exists and mkdir(exist_ok=True) accepts it, but no file can be created there,
    # even as root: the old demo trained first and died writing demo.json.
    line = _one_line_error(capsys, ["demo", *FAST, "--out", "/proc"])
    assert "--out" in line and "/proc" in line


def test_demo_out_that_is_a_file(tmp_path, capsys, no_training):
    afile = tmp_path / "f"
    afile.write_text("")
    assert "--out" in _one_line_error(capsys, ["demo", *FAST, "--out", str(afile / "sub")])


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        ("meta", "meta"),
        pytest.param(
            "mps",
            "MPS",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS"),
        ),
        pytest.param(
            "cuda",
            "CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
        ("tpu", "device"),
        ("cpu:x", "device"),
    ],
)
def test_demo_unavailable_device(tmp_path, capsys, no_training, device, needle):
    line = _one_line_error(capsys, ["demo", *FAST, "--device", device, "--out", str(tmp_path)])
    assert needle in line


@pytest.mark.parametrize(
    "extra",
    [
        ["--steps", "0"],
        ["--steps", "-3"],
        ["--batch", "0"],
        ["--seq", "0"],
        ["--seq", "100000000"],
        ["--lr", "nan"],
        ["--lr", "-1"],
        ["--lr", "inf"],
        ["--world-size", "2", "--batch", "3"],
    ],
)
def test_demo_absurd_numbers(tmp_path, capsys, no_training, extra):
    _one_line_error(capsys, ["demo", *FAST, *extra, "--out", str(tmp_path)])


# ------------------------------------------------------------------------------ plan


@pytest.mark.parametrize(
    "extra",
    [
        ["--seq", "0"],
        ["--seq", "-8192"],
        ["--seq", str(10**400)],  # was an OverflowError traceback
        ["--mbs", str(10**300)],  # was an OverflowError traceback
        ["--dp", str(10**20)],
        ["--layers", "0"],
        ["--tp", "1000000000"],  # its message used to wrap over two lines
        ["--pp", "0"],
        ["--pp", "4", "--chunks", "0"],
        ["--chunks", "0"],  # was accepted
        ["--microbatches", "0"],
        ["--pp", "8", "--microbatches", "3"],  # two lines before
        ["--bits", "0"],
        ["--bits", "-4"],
        ["--block", "0"],
        ["--format", "nope"],  # two lines before
        ["--schedule", "nope"],  # was accepted without pipelining
        ["--model", "nope"],  # two lines before
        ["--model", '{"hidden": 1}'],
        ["--set", "norm_bits=nan"],
        ["--set", "norm_bits=0"],
        ["--set", "swiglu_saves=-1"],
        ["--set", "swiglu_saves=1e400"],
        ["--set", "logits_bytes=inf"],
        ["--set", "overhead_gib=1e300"],  # printed an infinite prediction, exit 0
        ["--set", "expand_kv=3"],
        ["--set", "nope=1"],
        ["--set", "norm_bits"],
    ],
)
def test_plan_absurd_numbers(capsys, extra):
    _one_line_error(capsys, ["plan", *extra])


def test_plan_schedule_too_large_to_simulate(capsys):
    # The old planner would simulate torch's schedule for hours (not run on the old code).
    line = _one_line_error(capsys, ["plan", "--pp", "8", "--microbatches", "1000000000"])
    assert "too large" in line


def test_plan_valid_input_still_works(capsys):
    assert main(["plan", "--json"]) == 0
    assert '"memory_bytes"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- bench


@pytest.mark.parametrize(
    "extra",
    [
        ["--timeout", "nan"],
        ["--timeout", "0"],
        ["--timeout", "-1"],
        ["--dir", "/nonexistent-agoq-benchmarks"],
        ["--only", "no-such-benchmark"],
    ],
)
def test_bench_user_errors(capsys, extra):
    _one_line_error(capsys, ["bench", *extra, "--list"])


# ------------------------------------------------------------------- as a real process


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agoq.cli", "plan", "--set", "overhead_gib=1e300"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
