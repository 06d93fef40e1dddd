"""Developer sessions. They run in the environment agoq is installed in (see README):
nox must not build its own venvs here, because an unpinned torch would pull a multi-GB
CUDA build onto CPU machines."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

BENCHMARKS = sorted(str(p) for p in Path("benchmarks").glob("[a-z]*.py"))


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (GPU tests skip without CUDA)."""
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint + format check."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark; each rewrites its section of docs/benchmarks.md."""
    for script in BENCHMARKS:
        session.run("python", script, *session.posargs)
