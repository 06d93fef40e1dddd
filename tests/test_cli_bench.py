"""``agoq bench`` on a temporary benchmarks folder of tiny scripts (real subprocesses)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agoq.cli import main
from agoq.cli.bench import discover, find_dir


def _script(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(body)


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    _script(
        folder, "alpha", '"""Alpha succeeds."""\nimport sys\nprint("alpha ran", sys.argv[1:])\n'
    )
    _script(folder, "beta", '"""Beta fails."""\nprint("beta ran")\nraise SystemExit(3)\n')
    _script(
        folder,
        "gamma",
        '"""Gamma is long."""\nBENCH_LONG = True\nprint("gamma ran")\n',
    )
    # Helpers start with an underscore and are not benchmarks.
    _script(folder, "_report", 'raise SystemExit("a helper must not run")\n')
    return folder


def test_runs_all_reports_failure_and_skips_long(
    bench_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rc = main(["bench", "--dir", str(bench_dir)])
    out, _ = capfd.readouterr()
    assert rc == 1
    assert "alpha ran" in out and "beta ran" in out
    assert "gamma ran" not in out and "helper" not in out
    summary = out[out.rindex("agoq bench") :]
    assert "FAILED (exit 3)" in summary
    assert "ok" in summary
    assert "skipped (long" in summary


def test_all_includes_long_and_passes_args(
    bench_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rc = main(["bench", "--dir", str(bench_dir), "--all", "--skip", "beta", "--", "--quick"])
    out, _ = capfd.readouterr()
    assert rc == 0
    assert "alpha ran ['--quick']" in out
    assert "gamma ran" in out
    assert "beta ran" not in out and "skipped (--skip)" in out


def test_only_selects(bench_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dir", str(bench_dir), "--only", "alpha"]) == 0
    out, _ = capfd.readouterr()
    assert "alpha ran" in out and "beta ran" not in out and "gamma" not in out

    # Naming a long benchmark runs it; commas and repeats both work.
    assert main(["bench", "--dir", str(bench_dir), "--only", "gamma,alpha.py"]) == 0
    out, _ = capfd.readouterr()
    assert "gamma ran" in out and "alpha ran" in out and "beta ran" not in out


def test_unknown_name_is_an_error(bench_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--dir", str(bench_dir), "--only", "alpha,nope"])
    out, err = capfd.readouterr()
    assert rc == 2
    assert "unknown benchmark(s): nope" in err
    assert "alpha, beta, gamma" in err
    assert "alpha ran" not in out


def test_list_does_not_run(bench_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dir", str(bench_dir), "--list"]) == 0
    out, _ = capfd.readouterr()
    for name in ("alpha", "beta", "gamma"):
        assert name in out
    assert "Beta fails." in out and "skipped (long" in out
    assert "alpha ran" not in out and "beta ran" not in out


def test_missing_dir_is_an_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dir", str(tmp_path / "absent")]) == 2
    assert "--dir" in capfd.readouterr().err


def test_finds_the_repository_benchmarks() -> None:
    folder = find_dir()
    assert folder is not None and (folder / "_report.py").exists()
    names = {b.name for b in discover(folder)}
    assert {"codec", "allreduce"} <= names and "_report" not in names
    long = {b.name for b in discover(folder) if b.long}
    assert "codec" not in long
    assert "convergence" in names and "convergence" in long  # the ~25 min study is opt-in


def test_a_hung_script_is_stopped_with_its_children(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    pidfile = tmp_path / "child.pid"
    # The script starts a child that would outlive it, then hangs.
    _script(
        folder,
        "hang",
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n",
    )
    _script(folder, "ok", 'print("ok ran")\n')
    assert main(["bench", "--dir", str(folder), "--timeout", "3"]) == 1
    out = capfd.readouterr().out
    assert "timed out after 3 s" in out and "ok ran" in out
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the killed child is reaped by init shortly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hung script's child process survived")
    assert main(["bench", "--dir", str(folder), "--timeout", "nan"]) == 2
    assert "--timeout must be > 0" in capfd.readouterr().err
