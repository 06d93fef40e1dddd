"""Bad input to the training configs: agoq.train.TrainConfig and torchtitan's [agoq] section
(issue 10, class 4).

Wrong types raise ``TypeError`` naming the field (bools are not ints, strings are not
numbers or bools), bad values ``ValueError`` naming the field; nothing is coerced.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from agoq.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
try:
    from torchtitan_ext.config import Agoq
except ImportError:  # torchtitan_ext/ sits at the repository root
    sys.path.insert(0, str(ROOT))
    from torchtitan_ext.config import Agoq

TINY = dict(model="tiny", batch=4, seq=32, eval_batches=2, steps=1)


# ----------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    ("overrides", "exc", "field"),
    [
        ({"world_size": True}, TypeError, "world_size"),
        ({"world_size": 2.0}, TypeError, "world_size"),
        ({"steps": True}, TypeError, "steps"),
        ({"batch": 4.0}, TypeError, "batch"),
        ({"warmup": True}, TypeError, "warmup"),
        ({"warmup": 2.5}, TypeError, "warmup"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"lr": True}, TypeError, "lr"),
        ({"min_lr_ratio": True}, TypeError, "min_lr_ratio"),
        ({"min_lr_ratio": math.nan}, ValueError, "min_lr_ratio"),
        ({"weight_decay": math.nan}, ValueError, "weight_decay"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"weight_decay": "0.1"}, TypeError, "weight_decay"),
        ({"grad_clip": math.nan}, ValueError, "grad_clip"),
        ({"grad_clip": math.inf}, ValueError, "grad_clip"),
        ({"grad_clip": 0.0}, ValueError, "grad_clip"),
        ({"grad_clip": -1.0}, ValueError, "grad_clip"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -5.0}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": "60"}, TypeError, "timeout"),
        ({"model": 3}, TypeError, "model preset"),
        ({"grads": None}, TypeError, "gradient mode"),
        ({"plan": 4}, TypeError, "plan"),
        ({"device": 3}, TypeError, "device"),
        ({"device": "meta"}, ValueError, "meta"),
    ],
)
def test_train_config_refuses(overrides, exc, field):
    with pytest.raises(exc, match=re.escape(field)):
        TrainConfig(**{**TINY, **overrides}).validate()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_train_config_refuses_mps_without_mps():
    with pytest.raises(ValueError, match="MPS is not available"):
        TrainConfig(**TINY, device="mps").validate()


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has 8+ GPUs")
def test_train_config_refuses_a_cuda_index_that_is_not_there():
    with pytest.raises(ValueError, match="cuda:7"):
        TrainConfig(**TINY, device="cuda:7").validate()


def test_train_config_accepts_the_defaults_and_ints_for_floats():
    TrainConfig(**TINY).validate()
    TrainConfig(**TINY, lr=1, grad_clip=2, weight_decay=0, timeout=30).validate()


# -------------------------------------------------------------- torchtitan [agoq]


def test_agoq_section_numerics_defaults():
    cfg = Agoq()
    assert cfg.numerics_check_every == 0  # off
    assert cfg.numerics_threshold == 0.05
    assert cfg.numerics_action == "fallback"
    on = Agoq(numerics_check_every=100, numerics_threshold=1, numerics_action="raise")
    assert on.numerics_threshold == 1.0 and isinstance(on.numerics_threshold, float)


@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"numerics_check_every": -1}, ValueError, "numerics_check_every"),
        ({"numerics_check_every": True}, TypeError, "numerics_check_every"),
        ({"numerics_check_every": 1.5}, TypeError, "numerics_check_every"),
        ({"numerics_check_every": "100"}, TypeError, "numerics_check_every"),
        ({"numerics_threshold": 0.0}, ValueError, "numerics_threshold"),
        ({"numerics_threshold": -0.1}, ValueError, "numerics_threshold"),
        ({"numerics_threshold": math.nan}, ValueError, "numerics_threshold"),
        ({"numerics_threshold": math.inf}, ValueError, "numerics_threshold"),
        ({"numerics_threshold": True}, TypeError, "numerics_threshold"),
        ({"numerics_threshold": "0.05"}, TypeError, "numerics_threshold"),
        ({"numerics_activation_threshold": 0.0}, ValueError, "numerics_activation_threshold"),
        ({"numerics_activation_threshold": "1"}, TypeError, "numerics_activation_threshold"),
        ({"numerics_action": "ignore"}, ValueError, "numerics_action"),
        ({"numerics_action": None}, TypeError, "numerics_action"),
        ({"activation_bits": True}, TypeError, "activation_bits"),
        ({"activation_bits": 4.0}, TypeError, "activation_bits"),
        ({"activation_block": "128"}, TypeError, "activation_block"),
        ({"activation_min_numel": -1}, ValueError, "activation_min_numel"),
        ({"activation_min_numel": False}, TypeError, "activation_min_numel"),
        ({"activation_kinds": "attn_internals=8"}, TypeError, "activation_kinds"),
        ({"activation_kinds": {"attn_internals": True}}, TypeError, "attn_internals"),
        ({"activation_kinds": {"attn_internals": 8.0}}, TypeError, "attn_internals"),
        ({"activation_kinds": {1: 8}}, TypeError, "activation_kinds"),
        ({"activations": ["agoq"]}, TypeError, "activations"),
        ({"activation_format": None}, TypeError, "activation_format"),
        ({"recompute": "false"}, TypeError, "recompute"),
        ({"stage_aware": 1}, TypeError, "stage_aware"),
        ({"error_feedback": "no"}, TypeError, "error_feedback"),
        ({"grad_storage": 0}, TypeError, "grad_storage"),
        ({"report": "yes"}, TypeError, "report"),
        ({"grad_bits": True}, TypeError, "grad_bits"),
        ({"grad_bits": 4}, ValueError, "grad_bits"),
        ({"grad_block": 64.0}, TypeError, "grad_block"),
        ({"grad_block": -16}, ValueError, "grad_block"),
    ],
)
def test_agoq_section_refuses(kwargs, exc, field):
    with pytest.raises(exc, match=re.escape(field)) as e:
        Agoq(**kwargs)
    assert str(e.value).startswith("[agoq]")


def test_agoq_section_numerics_keys_parse_from_toml(tmp_path):
    from torchtitan_runs import require_torchtitan

    require_torchtitan("0.2.")  # the 0.2.2 adapter's TOML section
    pytest.importorskip("tokenizers")
    from torchtitan.config import ConfigManager

    import torchtitan_ext

    debug = Path(torchtitan_ext.__file__).parent / "debug_model.toml"
    good = tmp_path / "good.toml"
    good.write_text(debug.read_text() + "numerics_check_every = 50\nnumerics_action = 'warn'\n")
    cfg = ConfigManager().parse_args(["--job.config_file", str(good)])
    assert cfg.agoq.numerics_check_every == 50 and cfg.agoq.numerics_action == "warn"
    bad = tmp_path / "bad.toml"
    bad.write_text(debug.read_text() + 'numerics_threshold = "high"\n')
    with pytest.raises(TypeError, match=re.escape("[agoq] numerics_threshold")):
        ConfigManager().parse_args(["--job.config_file", str(bad)])
