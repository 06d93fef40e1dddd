"""Developer sessions. They run in the environment agoq is installed in (see README):
nox must not build its own venvs here, because an unpinned torch would pull a multi-GB
CUDA build onto CPU machines."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


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
    """The benchmarks via `agoq bench` (each rewrites its section of docs/benchmarks.md);
    the long convergence study only with `nox -s bench -- --all`; arguments for the scripts
    themselves after a second `--`, e.g. `nox -s bench -- --only codec -- --no-write`."""
    session.run("agoq", "bench", *session.posargs)
