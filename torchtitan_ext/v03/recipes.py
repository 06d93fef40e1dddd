"""torchtitan 0.3 recipes with agoq on (``--module torchtitan_ext.v03.recipes --config ...``).

Each is torchtitan's own llama3 recipe through :func:`~torchtitan_ext.v03.converter.with_agoq`,
with torchtitan's activation checkpointing off (agoq stores every saved activation in ~4 bits
instead of recomputing; with AC on agoq only sees the checkpointed blocks' inputs).
``AGOQ_TOML`` (environment) names a TOML file whose ``[agoq]`` table replaces the defaults,
e.g. ``torchtitan_ext/debug_model.toml`` (the 0.2.2 adapter's sample: one table, both
versions).
"""

from __future__ import annotations

import os
from typing import Any

from torchtitan.models.llama3 import config_registry as llama3

from .converter import with_agoq


def _agoq(config: Any) -> Any:
    config.activation_checkpoint = None
    return with_agoq(config, toml_file=os.environ.get("AGOQ_TOML", ""))


def llama3_debugmodel_agoq() -> Any:
    """torchtitan's ``llama3_debugmodel`` (6.2M parameters) with agoq."""
    return _agoq(llama3.llama3_debugmodel())


def llama3_8b_agoq() -> Any:
    """torchtitan's ``llama3_8b`` with agoq."""
    return _agoq(llama3.llama3_8b())
