"""The torchtitan 0.2.2 adapter (torchtitan_ext/): config section, converter, real training runs.

The training tests start torchtitan's own entry point (``torchtitan.train.main(Trainer)``,
through ``python -m torchtitan_ext.cpu_shims`` under torchrun) on CPU with gloo, 1 and 2
processes, on the llama3 debug model, the tiny stdlib-docstring tokenizer and text sample
(``torchtitan_ext.assets``), with the agoq converter on and off. Every subprocess has a
timeout (its whole process group is killed when it runs out). Skipped without torchtitan.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchtitan_ext/ sits at the repository root
    sys.path.insert(0, str(ROOT))

from torchtitan_runs import check_curves, finish, report, require_torchtitan, torchrun  # noqa: E402

torchtitan = require_torchtitan("0.2.")  # tests/test_torchtitan_v03.py covers 0.3
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

import torch  # noqa: E402

from torchtitan_ext.config import Agoq  # noqa: E402

EXT = ROOT / "torchtitan_ext"
DEBUG_TOML = EXT / "debug_model.toml"
LLAMA8B_TOML = EXT / "llama3_8b.toml"
STEPS = 8


# ------------------------------------------------------------------ config section


def test_defaults_build_the_paper_plan():
    import agoq

    cfg = Agoq()
    assert cfg.activation_plan() == agoq.ActivationPlan.agoq()
    assert Agoq(activations="off").activation_plan() is None
    plan = Agoq(activation_bits=8, activation_kinds={"attn_internals": 8}).activation_plan()
    assert plan.action("norm_input").bits == 8 and plan.action("norm_input").format == "int"
    assert plan.action("attn_internals").bits == 8


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"activations": "fp4"}, "activations"),
        ({"activation_bits": 7}, "activation_bits"),
        ({"activation_block": 100}, "activation plan"),
        ({"activation_kinds": {"attention": 8}}, "unknown kind 'attention'"),
        ({"activation_kinds": {"attn_internals": "half"}}, "attn_internals"),
        ({"grad_bits": 4}, "grad_bits"),
        ({"grad_block": 100}, "grad_block"),
        ({"report": "yes"}, "report"),
    ],
)
def test_bad_values_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as e:
        Agoq(**kwargs)
    assert str(e.value).startswith("[agoq]")


def _parse(args):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(args)


def test_sample_tomls_parse_with_the_agoq_section():
    for path in (DEBUG_TOML, LLAMA8B_TOML):
        cfg = _parse(["--job.config_file", str(path)])
        assert cfg.model.converters == ["agoq"], path
        assert cfg.experimental.custom_import == "torchtitan_ext.converter"
        assert isinstance(cfg.agoq, Agoq)
        assert cfg.agoq.activation_plan() is not None
    debug = _parse(["--job.config_file", str(DEBUG_TOML), "--agoq.activation_bits", "8"])
    assert debug.agoq.activation_bits == 8 and debug.model.flavor == "debugmodel"
    assert _parse(["--job.config_file", str(LLAMA8B_TOML)]).model.flavor == "8B"


def test_unknown_agoq_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(DEBUG_TOML.read_text() + "blok = 64\n")  # lands in the trailing [agoq]
    with pytest.raises(ValueError) as e:
        _parse(["--job.config_file", str(bad)])
    msg = str(e.value)
    assert "blok" in msg and "[agoq] section (valid keys: activations," in msg
    with pytest.raises(SystemExit):  # tyro: unrecognized flag
        _parse(["--job.config_file", str(DEBUG_TOML), "--agoq.blok", "64"])
    badval = tmp_path / "badval.toml"
    badval.write_text(DEBUG_TOML.read_text().replace("grad_bits = 8", "grad_bits = 4"))
    with pytest.raises(ValueError, match=r"\[agoq\] grad_bits"):
        _parse(["--job.config_file", str(badval)])


# ------------------------------------------------------------------ converter, in process


def _job(*args):
    return _parse(["--job.config_file", str(DEBUG_TOML), *args])


class _Dims:
    """The ParallelDims attributes the converter reads (single process, no parallelism)."""

    dp_replicate = dp_shard = pp = tp = cp = 1
    dp_enabled = dp_replicate_enabled = fsdp_enabled = pp_enabled = tp_enabled = False


def test_converter_is_registered_and_needs_the_section():
    from torchtitan.protocols.model_converter import _registry_model_converter_cls

    from torchtitan_ext.converter import AgoqConverter

    assert _registry_model_converter_cls["agoq"] is AgoqConverter
    job = _job()
    del job.agoq
    with pytest.raises(ValueError, match="custom_config_module torchtitan_ext.config"):
        AgoqConverter(job, _Dims())
    tp = _Dims()
    tp.tp, tp.tp_enabled = 2, True
    conv = AgoqConverter(_job(), tp)  # tensor parallelism is no longer refused
    assert conv.plan is not None and conv.grad_path is None
    compiled = ("--compile.enable", "--compile.components", "model")
    with pytest.raises(ValueError, match="tensor parallelism with torch.compile"):
        AgoqConverter(_job(*compiled), tp)  # torch 2.13's compiled DTensor backward fails
    AgoqConverter(_job(*compiled, "--agoq.activations", "off"), tp)


def test_converted_llama_trains_and_survives_the_pipeline_deepcopy():
    """convert() on torchtitan's llama3 debug model; each deepcopy (as the pipeline split
    makes) gets its own context on its first call; gradients match the unconverted model's
    within 4-bit error; evaluation forwards are left alone."""
    from torchtitan.models.llama3 import Transformer, llama3_args

    from torchtitan_ext.converter import AgoqConverter

    torch.manual_seed(0)
    args = copy.deepcopy(llama3_args["debugmodel"])
    args.n_layers, args.max_seq_len = 2, 64
    ref = Transformer(args)
    with torch.no_grad():
        ref.init_weights()
    model = copy.deepcopy(ref)
    conv = AgoqConverter(_job(), _Dims())
    conv.convert(model)
    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and type(model).__name__ == "AgoqTransformer"
    tokens = torch.randint(0, args.vocab_size, (2, 64))

    def grads(m):
        m.zero_grad()
        m(tokens).float().logsumexp(-1).mean().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    g_ref, g = grads(ref), grads(model)
    grads(twin)
    parts = list(conv._parts.values())
    assert len(parts) == 2 and parts[0].ctx is not parts[1].ctx
    rep = parts[0].ctx.report
    assert 0 < rep.stored_bytes < 0.5 * rep.original_bytes
    assert any(fqn.startswith("layers.0.") for fqn, _ in rep.rows)  # the part is the root
    rel = ((g - g_ref).norm() / g_ref.norm()).item()
    assert 0 < rel < 0.1, rel
    print(f"relative gradient error, agoq plan vs none: {rel:.4f}")
    n = len(rep.rows)
    rep.clear()
    with torch.no_grad():
        model(tokens)
    assert len(rep.rows) == 0 and n > 0
    conv.post_optimizer_hook([model, twin])
    assert conv.step == 1


def test_cpu_shims_refuse_a_late_call():
    import torchtitan.tools.utils as tt_utils

    from torchtitan_ext import cpu_shims

    if tt_utils.device_type == "cpu":
        pytest.skip("torchtitan already chose cpu in this process")
    with pytest.raises(RuntimeError, match="before torchtitan is imported"):
        cpu_shims.apply()


# ------------------------------------------------------------------ torchtitan runs on CPU


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from torchtitan_ext.assets import build_assets

    return build_assets(tmp_path_factory.mktemp("tt_assets"))


def _start(assets, tmp_path, nproc, *extra, agoq=True, name="run"):
    """Start torchrun -m torchtitan_ext.cpu_shims on the shipped debug TOML (non-blocking)."""
    toml = DEBUG_TOML
    if not agoq:
        toml = tmp_path / f"{name}.toml"
        text = DEBUG_TOML.read_text().replace('converters = ["agoq"]', "converters = []")
        assert "converters = []" in text
        toml.write_text(text)
    args = [
        "-m", "torchtitan_ext.cpu_shims",
        "--job.config_file", str(toml),
        "--job.dump_folder", str(tmp_path / name),
        "--model.hf_assets_path", str(assets.tokenizer_dir),
        "--training.dataset_path", str(assets.dataset_dir),
        "--training.steps", str(STEPS),
        "--training.seq_len", "128",
        "--training.local_batch_size", "4",
        "--training.mixed_precision_param", "float32",
        "--debug.seed", "0",
        "--metrics.disable_color_printing",
        "--comm.init_timeout_seconds", "60",
        "--comm.train_timeout_seconds", "60",
        *extra,
    ]  # fmt: skip
    return torchrun(args, nproc=nproc, cwd=tmp_path, name=name)


def _on_off(assets, tmp_path, nproc, *extra, on=(), off=()):
    """The converter on and off, started together; returns (on, off, on log, off log)."""
    p_on = _start(assets, tmp_path, nproc, *extra, *on, name="on")
    p_off = _start(assets, tmp_path, nproc, *extra, *off, agoq=False, name="off")
    (on_curve, on_log), (off_curve, off_log) = finish(p_on, STEPS), finish(p_off, STEPS)
    return on_curve, off_curve, on_log, off_log


def test_single_process_with_accumulation_and_grad_store(assets, tmp_path):
    args = ("--training.global_batch_size", "8")  # 2 micro-batches per step
    on, off, log, _ = _on_off(assets, tmp_path, 1, *args, on=("--agoq.grad_storage",))
    print(f"1 process: agoq {on}\n           off  {off}")
    check_curves(on, off)
    stored, original = report(log)
    assert 0 < stored < 0.35 * original
    assert "gradients off (no data parallelism)" in log
    peak = re.search(r"8-bit gradient store peak ([\d.]+) MiB", log)
    assert peak and float(peak.group(1)) > 5  # 6.2M gradients held in 8 bits (+ residual)


def test_two_processes_fsdp(assets, tmp_path):
    on, off, log, _ = _on_off(assets, tmp_path, 2)
    print(f"2 processes FSDP: agoq {on}\n                  off  {off}")
    check_curves(on, off)
    calls = re.findall(r"int8 reduce-scatter calls so far (\d+) \(\+0 full-precision\)", log)
    assert calls and int(calls[-1]) >= STEPS, calls  # the int8 comm really ran
    assert "int8 reduce-scatter on 10 FSDP modules" in log


def test_two_processes_ddp_with_error_feedback(assets, tmp_path):
    ddp = (
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
    )  # fmt: skip
    # The "on" run also has the numerics guard on (it does not change the run unless it
    # acts): it checks in the int8 hook state and after the optimizer step.
    guard = ("--agoq.numerics_check_every", "2")
    on, off, log, _ = _on_off(assets, tmp_path, 2, *ddp, on=guard)
    print(f"2 processes DDP: agoq {on}\n                 off  {off}")
    check_curves(on, off)
    assert "int8 all-reduce DDP comm hook with error feedback" in log
    calls = re.findall(r"int8 all-reduce hook calls so far (\d+)", log)
    assert calls and int(calls[-1]) >= STEPS, calls
    assert "numerics guard every 2 steps on activations and DDP gradient buckets" in log
    for name in ("grad/bucket0", "activations"):
        found = re.findall(rf"agoq numerics at step (\d+): {name} rel_err=([\d.e+-]+)", log)
        steps = sorted({int(s) for s, _ in found})
        # Every due step; the hook never checks step 0 (DDP rebuilds its buckets after it).
        assert steps in ([0, 2, 4, 6], [2, 4, 6]), (name, found)
        for step in steps:  # one line per replica, same value: the replicas agree
            values = {v for s, v in found if int(s) == step}
            assert len(values) == 1, (name, step, found)
        limit = 0.05 if name.startswith("grad") else 0.5
        assert all(0 < float(v) < limit for _, v in found), found


def test_two_processes_tensor_parallel(assets, tmp_path):
    """torchtitan's own TP + sequence parallel (parallelize_llama: colwise/rowwise
    projections, sequence-parallel norms, loss parallel) on 2 gloo ranks."""
    tp = (
        "--parallelism.tensor_parallel_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
    )  # fmt: skip
    on, off, log, off_log = _on_off(assets, tmp_path, 2, *tp)
    print(f"2 processes TP: agoq {on}\n                off  {off}")
    for text in (log, off_log):
        assert "Applied Tensor Parallelism to the model" in text
    check_curves(on, off)
    stored, original = report(log)
    assert 0 < stored < 0.35 * original
    # The sequence-parallel norm inputs (DTensors) really are quantized, 4-bit + scales.
    norm = re.search(r"norm_input\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)", log)
    assert norm, "no norm_input row in the report"
    assert norm.group(6) == f"quantized:{norm.group(2)}" and float(norm.group(5)) < 4.3
    assert "gradients off (no data parallelism)" in log


def test_two_processes_pipeline_stage_aware(assets, tmp_path):
    pp = (
        "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.data_parallel_shard_degree", "1",
        "--parallelism.pipeline_parallel_schedule", "1F1B",
    )  # fmt: skip
    on, off, log, _ = _on_off(assets, tmp_path, 2, *pp, on=("--agoq.grad_storage",))
    print(f"2 processes PP 1F1B: agoq {on}\n                     off  {off}")
    check_curves(on, off)
    # 1F1B, 2 ranks, 4 micro-batches: rank 0 holds 2 in flight, rank 1 one -> 4 / 8 bits
    # The plan's int8 kinds (q/k norm inputs, attention probabilities) stay int8.
    assert "pp rank 0/2, 1F1B, 4 micro-batches, 1 stage(s)/rank -> bits [4, 8]" in log
    assert "pp rank 1/2, 1F1B, 4 micro-batches, 1 stage(s)/rank -> bits [8]" in log
    assert "8-bit gradient store peak" in log
