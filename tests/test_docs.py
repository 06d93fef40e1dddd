"""The docs stay in step with the code: every exported name is in docs/api.md, and every
relative link in README.md and docs/*.md points to a file that exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"

# Modules whose ``__all__`` must be documented, and public names of modules without one.
MODULES_WITH_ALL = (
    "agoq",
    "agoq.quant",
    "agoq.activations",
    "agoq.gradients",
    "agoq.gradients.ddp",
    "agoq.gradients.fsdp",
    "agoq.pipeline",
    "agoq.planner",
)
EXTRA_NAMES = {"agoq.memory": ("MemoryReport", "compiled_saved_bytes")}

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _exported() -> list[tuple[str, str]]:
    names: list[tuple[str, str]] = []
    for mod_name in MODULES_WITH_ALL:
        module = importlib.import_module(mod_name)
        assert hasattr(module, "__all__"), f"{mod_name} has no __all__"
        names += [(mod_name, n) for n in module.__all__]
    for mod_name, extra in EXTRA_NAMES.items():
        module = importlib.import_module(mod_name)
        for n in extra:
            assert hasattr(module, n), f"{mod_name}.{n} no longer exists"
            names.append((mod_name, n))
    return names


def _documented(text: str, name: str) -> bool:
    """A heading of api.md names it: "### `name`", "### `name(...)`"."""
    pattern = rf"^#{{1,6}} .*`{re.escape(name)}[`(]"
    return re.search(pattern, text, re.M) is not None


def test_every_exported_name_is_documented() -> None:
    text = API.read_text(encoding="utf-8")
    missing = sorted({f"{m}.{n}" for m, n in _exported() if not _documented(text, n)})
    assert not missing, f"not documented in docs/api.md (as a heading): {missing}"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out = []
    for target in LINK.findall(text):
        target = target.strip("<>")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, in-page anchors
        out.append(target.split("#", 1)[0])
    return out


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    broken = [t for t in _relative_links(path) if t and not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_link_checker_sees_links() -> None:
    """Guard against a regex that silently matches nothing."""
    links = _relative_links(ROOT / "README.md")
    assert "docs/activations.md" in links and "docs/gradients.md" in links
