"""``agoq bench``: run the scripts in ``benchmarks/`` and so refresh docs/benchmarks.md.

Each ``benchmarks/[a-z]*.py`` rewrites its own section of docs/benchmarks.md (through
``benchmarks/_report.py``; the convergence study writes docs/results.md), as
``nox -s bench`` does. The scripts live at the
repository root, not in the wheel, so this command needs a checkout: it looks for
``benchmarks/`` above the editable install (``<repo>/src/agoq`` -> ``<repo>/benchmarks``),
then in the current directory, unless ``--dir`` names the folder.

Long benchmarks (a study that takes tens of minutes) are skipped unless ``--all`` is given
or ``--only`` names them. A script is long when it assigns ``BENCH_LONG = True`` at module
level (read from the source with :mod:`ast`, never imported).
"""

from __future__ import annotations

import argparse
import ast
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Module-level marker a script sets to be skipped by default.
LONG_MARKER = "BENCH_LONG"


@dataclass(frozen=True)
class Benchmark:
    """One script of the benchmarks folder."""

    name: str
    path: Path
    long: bool
    summary: str


@dataclass
class Outcome:
    """What happened to one benchmark in this run."""

    name: str
    status: str
    seconds: float | None = None
    ok: bool = True


def _split_names(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``; ``.py`` suffixes are dropped."""
    names: list[str] = []
    for value in values or []:
        for part in value.split(","):
            part = part.strip().removesuffix(".py")
            if part and part not in names:
                names.append(part)
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``agoq bench``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Each script rewrites its own part of the docs (a section of docs/benchmarks.md;\n"
        "the convergence study writes docs/results.md). Long benchmarks (a script that\n"
        f"sets `{LONG_MARKER} = True` at module level, e.g. convergence) are skipped\n"
        "unless --all is given or --only names them.\n\n"
        "examples:\n"
        "  agoq bench --list\n"
        "  agoq bench --only codec,allreduce\n"
        "  agoq bench --only codec -- --no-write   # arguments after -- go to every script"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="the benchmarks folder (default: <repo>/benchmarks above the editable install, "
        "else ./benchmarks)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help="run only these benchmarks (long ones included when named); repeatable",
    )
    parser.add_argument(
        "--skip",
        action="append",
        metavar="NAME[,NAME]",
        help="leave these benchmarks out; repeatable",
    )
    parser.add_argument(
        "--all", action="store_true", help="include the long benchmarks (tens of minutes)"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the benchmarks found and exit without running"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=7200.0,
        metavar="SECONDS",
        help="stop a script that runs longer than this, and report it failed (default 7200)",
    )
    parser.add_argument(
        "script_args",
        nargs="*",
        metavar="-- ARGS",
        help="passed on to every script run (after --), e.g. -- --no-write",
    )


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def find_dir(explicit: Path | None = None) -> Path | None:
    """The benchmarks folder: ``explicit``, else the checkout above the editable install,
    else ``./benchmarks``; ``None`` when none of them is a folder."""
    if explicit is not None:
        return explicit.resolve() if explicit.is_dir() else None
    import agoq

    package = Path(agoq.__file__).resolve().parent  # <repo>/src/agoq in an editable install
    candidates = [package.parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("[a-z]*.py")):
            return candidate
    return None


def _inspect(path: Path) -> tuple[bool, str]:
    """(has a module-level ``BENCH_LONG = True``, first paragraph of the docstring)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return False, ""
    long = False
    for node in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if any(isinstance(t, ast.Name) and t.id == LONG_MARKER for t in targets):
            long = isinstance(value, ast.Constant) and value.value is True
    first_paragraph = (ast.get_docstring(tree) or "").strip().split("\n\n")[0]
    return long, " ".join(first_paragraph.split())


def discover(folder: Path) -> list[Benchmark]:
    """Every ``[a-z]*.py`` script of ``folder`` (helpers such as ``_report.py`` excluded),
    sorted by name."""
    found = []
    for path in sorted(folder.glob("[a-z]*.py")):
        marked, summary = _inspect(path)
        found.append(Benchmark(path.stem, path, marked, summary))
    return found


def _print_list(benchmarks: list[Benchmark], folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"benchmarks in {folder}")
    table.add_column("name")
    table.add_column("default")
    table.add_column("what it measures")
    for b in benchmarks:
        table.add_row(b.name, "skipped (long; --all)" if b.long else "runs", b.summary)
    Console().print(table)


def _print_summary(outcomes: list[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="agoq bench")
    table.add_column("benchmark")
    table.add_column("seconds", justify="right")
    table.add_column("status")
    for o in outcomes:
        seconds = "" if o.seconds is None else f"{o.seconds:.1f}"
        style = "green" if o.ok and o.seconds is not None else ("red" if not o.ok else "dim")
        table.add_row(o.name, seconds, f"[{style}]{o.status}[/{style}]")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Run ``agoq bench``; 0 when every benchmark run succeeded, 1 when any failed,
    2 on a usage error (no benchmarks folder, unknown names), 130 when interrupted."""
    if not args.timeout > 0:  # also rejects nan
        print(f"agoq bench: --timeout must be > 0 seconds, got {args.timeout}", file=sys.stderr)
        return 2
    folder = find_dir(args.dir)
    if folder is None:
        where = (
            f"{args.dir} is not a folder"
            if args.dir is not None
            else "no benchmarks/ folder above the agoq install nor in the current directory"
        )
        print(
            f"agoq bench: {where}; the benchmarks live in a checkout of the agoq repository "
            "(pip install -e .), or point at them with --dir PATH",
            file=sys.stderr,
        )
        return 2
    benchmarks = discover(folder)
    if not benchmarks:
        print(f"agoq bench: no [a-z]*.py scripts in {folder}", file=sys.stderr)
        return 2
    by_name = {b.name: b for b in benchmarks}
    only, skip = _split_names(args.only), _split_names(args.skip)
    unknown = [n for n in only + skip if n not in by_name]
    if unknown:
        print(
            f"agoq bench: unknown benchmark(s): {', '.join(unknown)}; "
            f"valid names: {', '.join(by_name)}",
            file=sys.stderr,
        )
        return 2
    if args.list:
        _print_list(benchmarks, folder)
        return 0

    outcomes: list[Outcome] = []
    todo: list[Benchmark] = []
    for b in benchmarks:
        if only and b.name not in only:
            continue
        if b.name in skip:
            outcomes.append(Outcome(b.name, "skipped (--skip)"))
        elif b.long and not args.all and not only:
            outcomes.append(Outcome(b.name, "skipped (long; --all or --only to run)"))
        else:
            todo.append(b)

    interrupted = False
    for b in todo:
        cmd = [sys.executable, str(b.path), *args.script_args]
        print(f"\n=== agoq bench: {b.name} ({' '.join(cmd)}) ===", flush=True)
        sys.stderr.flush()
        t0 = time.perf_counter()
        # Output is inherited, so it streams as the script writes it. A session of its own,
        # so that a hung script is stopped together with the ranks it spawned.
        proc = subprocess.Popen(cmd, cwd=folder.parent, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except KeyboardInterrupt:
            _kill(proc)
            outcomes.append(Outcome(b.name, "interrupted", time.perf_counter() - t0, ok=False))
            interrupted = True
            break
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
        seconds = time.perf_counter() - t0
        if rc is None:
            outcomes.append(
                Outcome(b.name, f"FAILED (timed out after {args.timeout:g} s)", seconds, ok=False)
            )
        elif rc == 0:
            outcomes.append(Outcome(b.name, "ok", seconds))
        else:
            outcomes.append(Outcome(b.name, f"FAILED (exit {rc})", seconds, ok=False))
    if interrupted:
        done = {o.name for o in outcomes}
        outcomes += [Outcome(b.name, "not run (interrupted)") for b in todo if b.name not in done]

    order = {b.name: i for i, b in enumerate(benchmarks)}
    outcomes.sort(key=lambda o: order[o.name])
    print(flush=True)
    _print_summary(outcomes)
    if interrupted:
        return 130
    return 1 if any(not o.ok for o in outcomes) else 0
