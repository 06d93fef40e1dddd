"""Real, human-written English text available offline: the docstrings of Python's stdlib.

No download and no generated data: the text is gathered at run time from the standard
library that ships with every Python, and tokenized as bytes (vocabulary 256).
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

VOCAB_SIZE = 256


@lru_cache(maxsize=4)
def stdlib_docstrings(max_chars: int = 4_000_000) -> str:
    """Docstrings of the standard library's modules, classes and functions, joined by blank
    lines, in a fixed (sorted-path) order; at most ``max_chars`` characters.

    Parsing the stdlib takes seconds, so the result is cached under ``$XDG_CACHE_HOME/agoq``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agoq"
    cache = (
        cache_dir / f"stdlib-docstrings-{sys.version_info[0]}.{sys.version_info[1]}-{max_chars}.txt"
    )
    if cache.exists():
        return cache.read_text(encoding="ascii")
    text = _gather(root, max_chars)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(text, encoding="ascii")
    except OSError:
        pass  # a read-only home only costs the parse next time
    return text


def _gather(root: Path, max_chars: int) -> str:
    parts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "lib2to3") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and doc.isascii():
                    parts.append(doc)
                    total += len(doc) + 2
                    if total >= max_chars:
                        return "\n\n".join(parts)[:max_chars]
    return "\n\n".join(parts)


def text_tokens(max_chars: int = 4_000_000) -> torch.Tensor:
    """The corpus as int64 byte ids."""
    data = stdlib_docstrings(max_chars).encode("ascii")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def split(tokens: torch.Tensor, holdout: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): the last ``holdout`` fraction is held out."""
    cut = int(len(tokens) * (1 - holdout))
    return tokens[:cut], tokens[cut:]


def sample(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq + 1`` tokens (inputs and next-token targets)."""
    starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq + 1] for s in starts.tolist()])
