"""The torchtitan 0.3 adapter (torchtitan_ext/v03/): converter config, conversion, real runs.

The training tests start torchtitan 0.3's own entry point (``torchtitan.train.main()``,
through ``python -m torchtitan_ext.v03.cpu_shims`` under torchrun) on CPU with gloo, on the
llama3 debug model with the tiny stdlib-docstring tokenizer and text sample
(``torchtitan_ext.assets``): agoq's recipe (``torchtitan_ext.v03.recipes``) against
torchtitan's own ``llama3_debugmodel`` with the same settings (activation checkpointing off
in both). Skipped unless torchtitan 0.3 is installed (the CI leg with torch 2.14.1).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchtitan_ext/ sits at the repository root
    sys.path.insert(0, str(ROOT))

from torchtitan_runs import check_curves, finish, report, require_torchtitan, torchrun  # noqa: E402

require_torchtitan("0.3.")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

import torch  # noqa: E402

from torchtitan_ext.config import Agoq  # noqa: E402

DEBUG_TOML = ROOT / "torchtitan_ext" / "debug_model.toml"
STEPS = 8

# torchtitan's own recipe, activation checkpointing off: the baseline ("adapter off").
BASELINE = """
from torchtitan.models.llama3.config_registry import llama3_debugmodel


def baseline():
    config = llama3_debugmodel()
    config.activation_checkpoint = None
    return config
"""


# ------------------------------------------------------------------ config and conversion


def _debug_config():
    from torchtitan.models.llama3 import model_registry

    return model_registry("debugmodel").model


def test_one_agoq_table_serves_both_versions(tmp_path):
    """The 0.2.2 sample TOML's [agoq] table, read by the 0.3 converter's config."""
    from torchtitan_ext.v03.converter import AgoqConverter

    conv = AgoqConverter.Config(toml_file=str(DEBUG_TOML)).build()
    import tomllib

    table = tomllib.loads(DEBUG_TOML.read_text())["agoq"]
    assert table, "the sample has an [agoq] table"
    for key, value in table.items():  # independent reading of the same file
        assert getattr(conv.settings, key) == value, key
    assert conv.settings.activation_plan() == Agoq(**table).activation_plan()
    bad = tmp_path / "bad.toml"
    bad.write_text("[agoq]\nblok = 64\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) blok .*valid keys: activations,"):
        AgoqConverter.Config(toml_file=str(bad)).build()
    bad.write_text("[agoq]\ngrad_bits = 4\n")
    with pytest.raises(ValueError, match=r"\[agoq\] grad_bits"):
        AgoqConverter.Config(toml_file=str(bad)).build()
    bad.write_text("[training]\nsteps = 2\n")
    with pytest.raises(ValueError, match="no \\[agoq\\] table"):
        AgoqConverter.Config(toml_file=str(bad)).build()
    with pytest.raises(ValueError, match="not both"):
        AgoqConverter.Config(agoq=Agoq(), toml_file=str(DEBUG_TOML)).build()


def test_converted_model_is_a_torchtitan_module_and_refuses_to_run_unwired():
    from torchtitan.models.llama3 import model_registry

    from torchtitan_ext._runtime import AgoqCall
    from torchtitan_ext.v03.converter import AgoqConverter

    spec = model_registry("debugmodel", converters=[AgoqConverter.Config()])
    cfg = spec.model
    assert type(cfg).__name__ == "Config" and issubclass(type(cfg), type(_debug_config()))
    with torch.device("meta"):
        model = cfg.build()
    assert isinstance(model, AgoqCall) and type(model).__name__ == "AgoqLlama3Model"
    model.verify_module_protocol()  # every submodule is still a torchtitan Module
    with torch.device("meta"):
        ref = _debug_config().build()
    shapes = {n: p.shape for n, p in ref.named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # only the class changed
    assert [type(m) for m in model.modules()][1:] == [type(m) for m in ref.modules()][1:]
    with pytest.raises(RuntimeError, match="applied twice"):
        AgoqConverter.Config().build().convert(cfg)
    model = cfg.build()  # on CPU; no post_optimizer_build_fn ran: a clear error, not a no-op
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="post_optimizer_build_fn never ran"):
        model(tokens)


def test_with_agoq_chains_the_model_post_optimizer_build_fn():
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from torchtitan_ext.v03.converter import with_agoq

    calls = []
    config = llama3_debugmodel()
    config.model_spec.post_optimizer_build_fn = lambda o, parts, pd: calls.append("model's own")
    with_agoq(config)
    fn = config.model_spec.post_optimizer_build_fn
    with pytest.raises(RuntimeError, match="update_from_config"):
        fn(None, [config.model_spec.model.build()], None)  # built outside the Trainer
    assert calls == ["model's own"]  # the model's own hook ran first


# ------------------------------------------------------------------ torchtitan 0.3 runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from torchtitan_ext.assets import build_assets

    return build_assets(tmp_path_factory.mktemp("tt03_assets"))


def _start(assets, tmp_path, nproc, *extra, agoq=True, toml="", name="run"):
    (tmp_path / "tt_baseline.py").write_text(BASELINE)
    recipe = (
        ["--module", "torchtitan_ext.v03.recipes", "--config", "llama3_debugmodel_agoq"]
        if agoq
        else ["--module", "tt_baseline", "--config", "baseline"]
    )
    args = [
        "-m", "torchtitan_ext.v03.cpu_shims", *recipe,
        "--dump_folder", str(tmp_path / name),
        "--hf_assets_path", str(assets.tokenizer_dir),
        "--dataloader.dataset_path", str(assets.dataset_dir),
        "--training.steps", str(STEPS),
        "--training.seq_len", "128",
        "--training.local_batch_size", "4",
        "--training.mixed_precision_param", "float32",
        "--training.disable_cuda_graphs",
        "--debug.seed", "0",
        "--metrics.disable_color_printing",
        "--checkpoint.no-enable",
        "--validator.no-enable",
        "--comm.init_timeout_seconds", "60",
        "--comm.train_timeout_seconds", "60",
        *extra,
    ]  # fmt: skip
    env: dict[str, str] = {}
    if toml:
        path = tmp_path / f"{name}.toml"
        path.write_text(toml)
        env["AGOQ_TOML"] = str(path)
    return torchrun(args, nproc=nproc, cwd=tmp_path, env=env, name=name)


def _on_off(assets, tmp_path, nproc, *extra, toml=""):
    p_on = _start(assets, tmp_path, nproc, *extra, toml=toml, name="on")
    p_off = _start(assets, tmp_path, nproc, *extra, agoq=False, name="off")
    (on, log), (off, off_log) = finish(p_on, STEPS), finish(p_off, STEPS)
    print(f"agoq {on}\noff  {off}")
    check_curves(on, off, fall=0.25)
    assert "[agoq]" not in off_log
    stored, original = report(log)
    print(f"saved activations, agoq: {stored} of {original} MiB ({stored / original:.3f}x)")
    assert 0 < stored < 0.35 * original
    return log


def test_single_process_with_accumulation_and_grad_store(assets, tmp_path):
    log = _on_off(
        assets,
        tmp_path,
        1,
        "--training.global_batch_size",
        "8",
        toml="[agoq]\ngrad_storage = true\n",
    )
    assert "converter on (torchtitan 0.3)" in log
    assert "gradients off (no data parallelism)" in log
    peak = re.search(r"8-bit gradient store peak ([\d.]+) MiB", log)
    assert peak and float(peak.group(1)) > 5  # 6.2M gradients held in 8 bits (+ residual)


def test_two_processes_fsdp(assets, tmp_path):
    log = _on_off(assets, tmp_path, 2)
    assert "int8 reduce-scatter on 10 FSDP modules" in log
    calls = re.findall(r"int8 reduce-scatter calls so far (\d+) \(\+0 full-precision\)", log)
    assert calls and int(calls[-1]) >= STEPS, calls  # the int8 comm really ran


def test_two_processes_pipeline_1f1b_stage_aware(assets, tmp_path):
    pp = (
        "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
        "--parallelism.pipeline_parallel_schedule", "1F1B",
    )  # fmt: skip
    log = _on_off(assets, tmp_path, 2, *pp, toml="[agoq]\ngrad_storage = true\n")
    # 1F1B, 2 ranks, 4 micro-batches: rank 0 holds 2 in flight, rank 1 one -> 4 / 8 bits;
    # the plan's int8 kinds stay int8.
    assert "pp rank 0/2, 1F1B, 4 micro-batches, 1 stage(s)/rank -> bits [4, 8]" in log
    assert "pp rank 1/2, 1F1B, 4 micro-batches, 1 stage(s)/rank -> bits [8]" in log
    assert "8-bit gradient store peak" in log


def test_two_processes_tensor_parallel(assets, tmp_path):
    tp = (
        "--parallelism.tensor_parallel_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
    )  # fmt: skip
    log = _on_off(assets, tmp_path, 2, *tp)
    # The sequence-parallel norm inputs (DTensors) really are quantized, 4-bit + scales.
    norm = re.search(r"norm_input\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)", log)
    assert norm, "no norm_input row in the report"
    assert "quantized" in norm.group(6) and float(norm.group(4)) < 0.2 * float(norm.group(3))
