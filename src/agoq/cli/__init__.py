"""The ``agoq`` command: ``agoq demo``, ``agoq plan``, ``agoq bench`` and ``agoq explain``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Building the parser imports every subcommand module, so those keep
their heavy imports (matplotlib, the training stack) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "agoq.cli.demo",
        "train the reference LLaMA on real text, baseline vs agoq side by side",
    ),
    "plan": (
        "agoq.cli.plan",
        "predict per-GPU memory (weights, gradients, optimizer, activations) for a layout",
    ),
    "bench": ("agoq.cli.bench", "run the benchmark scripts and refresh docs/benchmarks.md"),
    "explain": (
        "agoq.cli.explain",
        "show which kind, format and mode each saved activation of a model gets",
    ),
}


def user_error(command: str, message: object) -> int:
    """Report a user error as ONE line on stderr (no traceback, no wrapping, no markup) and
    return the usage-error exit status 2."""
    text = " ".join(str(message).split())
    print(f"agoq {command}: {text}", file=sys.stderr, flush=True)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand's options."""
    from agoq import __version__

    parser = argparse.ArgumentParser(
        prog="agoq", description="4-bit activations and 8-bit gradients for PyTorch training."
    )
    parser.add_argument("--version", action="version", version=f"agoq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agoq`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
