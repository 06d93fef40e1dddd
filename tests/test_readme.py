"""The README's two usage examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agoq.spawn import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def _example(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python example under {heading!r}"
    return match.group(1)


def test_activation_example_runs_and_stores_less(capsys) -> None:
    code = _example("Activations: `quantize_activations`")
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    report = scope["ctx"].report
    assert 0 < report.stored_bytes < report.original_bytes / 2
    assert all(p.grad is not None for p in scope["model"].parameters())
    assert "total" in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_gradient_example_runs_under_two_ranks(tmp_path) -> None:
    code = _example("Gradients: `int8_allreduce`")
    # Launched as torchrun would: env:// rendezvous on loopback; each rank saves its grads.
    code += (
        "\nimport sys\n"
        "torch.save([p.grad for p in model.parameters()], sys.argv[1] + f'/{dist.get_rank()}.pt')\n"
        "dist.destroy_process_group()\n"
    )
    script = tmp_path / "example.py"
    script.write_text(code)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    import torch

    g0, g1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    # Every rank ends with the same reduced gradient (all-gathered int8 codes).
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert any(a.abs().sum() > 0 for a in g0)
