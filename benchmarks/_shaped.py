"""Run a benchmark's measurement under ``../shared/tools/shaped-net`` (a private network
namespace whose loopback is rate-limited with tc tbf, so gloo ranks on 127.0.0.1 are
bandwidth-bound), and get its figures back as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPED_NET = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "shaped-net"


def link_name(rate: str) -> str:
    """``none`` -> "loopback"; ``1gbit`` -> "1 Gbit/s"."""
    if rate == "none":
        return "loopback"
    return rate.replace("gbit", " Gbit/s").replace("mbit", " Mbit/s")


def run_shaped(
    rate: str, script: Path, args: list[str], shaped_net: Path = SHAPED_NET
) -> dict | str:
    """Run ``python script --child-json PATH *args`` under ``shaped-net --rate rate``: the
    JSON the child wrote, or a one-line reason why there is none (no shaped-net, not root,
    the child failed). The child's output streams through."""
    if not shaped_net.exists():
        return f"not run: {shaped_net} not found"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [str(shaped_net), "--rate", rate, "--", sys.executable, str(script),
               "--child-json", path, *args]  # fmt: skip
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not os.path.exists(path):
            return f"not run: shaped-net --rate {rate} exited with {proc.returncode}"
        return json.loads(Path(path).read_text())
