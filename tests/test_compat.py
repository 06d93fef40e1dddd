"""agoq._compat: the one home of agoq's private-torch use.

* ``import agoq`` plus the codec and an ActivationPlan import no private torch module
  (a subprocess, with the private modules agoq uses made unimportable, compared with a
  subprocess that only imports torch).
* Each compat entry, with its private API taken away, raises an error naming the agoq
  feature, the missing API and the tested torch range, or takes its documented fallback.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from agoq import _compat
from agoq._compat import TESTED_TORCH, TorchCompatError

_ROOT = Path(__file__).resolve().parents[1]
_TESTED = f"tested on torch {' and '.join(TESTED_TORCH)}"

# The private torch modules agoq's compat entries resolve, plus the heavy private
# subsystems an eager import of one of them drags in.
_BLOCKED = (
    "torch._functorch._aot_autograd",
    "torch._functorch.config",
    "torch._dynamo",
    "torch._inductor",
    "torch.distributed._functional_collectives",
    "torch.distributed.fsdp._fully_shard",
    "torch.distributed.pipelining",
    "torch.distributed.tensor",
)

_BASELINE = "import json, sys, torch; print(json.dumps(sorted(sys.modules)))"

_WITH_AGOQ = textwrap.dedent(
    """
    import json, sys
    import torch  # first: what torch itself imports is the baseline, not blocked

    BLOCKED = {blocked!r}
    tried = []

    class Block:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                tried.append(name)
                raise ImportError("blocked by test_compat: " + name)
            return None

    sys.meta_path.insert(0, Block())
    import agoq

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    spec = agoq.QuantSpec(bits=8, format="int", block=128)
    y = agoq.dequantize(agoq.quantize(x, spec))
    # Independent bound: per block, half a step of absmax / 127.
    step = x.reshape(-1, 128).abs().amax(dim=1, keepdim=True) / 127
    err_ok = bool(((y - x).reshape(-1, 128).abs() <= step * 0.5 * (1 + 1e-6)).all())
    plan = agoq.ActivationPlan.agoq()
    fb = agoq.dequantize(agoq.quantize(x, plan.fallback))
    plan.describe()
    print(json.dumps({{
        "modules": sorted(sys.modules),
        "tried": tried,
        "err_ok": err_ok,
        "fallback_shape": list(fb.shape),
    }}))
    """
)


def _run(*codes: str) -> list:
    """Run each snippet in its own fresh interpreter (in parallel); their JSON results."""
    env = {"PYTHONPATH": f"{_ROOT / 'src'}:{_ROOT}", "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for code in codes
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _private(name: str) -> bool:
    return name.startswith("torch.") and any(p.startswith("_") for p in name.split(".")[1:])


def test_import_agoq_touches_no_private_torch_module() -> None:
    baseline, r = _run(_BASELINE, _WITH_AGOQ.format(blocked=_BLOCKED))
    baseline = set(baseline)
    assert r["tried"] == [], f"agoq tried to import private modules: {r['tried']}"
    new_private = sorted(m for m in set(r["modules"]) - baseline if _private(m))
    assert new_private == []
    assert r["err_ok"] is True
    assert r["fallback_shape"] == [4, 256]


# ------------------------------------------------------------- version gates


def test_require_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "__version__", "2.12.1")
    with pytest.raises(TorchCompatError) as e:
        _compat.require_torch("the FSDP2 int8 reduce-scatter", "2.13")
    msg = str(e.value)
    assert "the FSDP2 int8 reduce-scatter needs torch >= 2.13" in msg
    assert _TESTED in msg and "2.12.1" in msg
    for ok in ("2.13.0a0+git1234", "2.13.0", "2.14.1", "3.0.0"):
        monkeypatch.setattr(torch, "__version__", ok)
        _compat.require_torch("x", "2.13")
        assert _compat.torch_version() >= (2, 13)


def test_fsdp_reduce_scatter_base_gated_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    base = _compat.fsdp_reduce_scatter_base
    base.cache_clear()
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    with pytest.raises(TorchCompatError, match=r"Int8ReduceScatter.*needs torch >= 2\.13"):
        base()
    monkeypatch.undo()
    name = "torch.distributed.fsdp._fully_shard._fsdp_api"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(TorchCompatError) as e:
        base()
    assert "FSDP2 int8 reduce-scatter" in str(e.value)
    assert f"{name}.ReduceScatter" in str(e.value) and _TESTED in str(e.value)
    monkeypatch.undo()
    assert base() is ReduceScatter
    base.cache_clear()


def test_int8_reduce_scatter_is_built_lazily_on_the_fsdp_interface() -> None:
    import agoq
    import agoq.gradients
    import agoq.gradients.fsdp as fsdp

    cls = agoq.Int8ReduceScatter
    assert cls is agoq.gradients.Int8ReduceScatter is fsdp.Int8ReduceScatter
    assert issubclass(cls, _compat.fsdp_reduce_scatter_base())
    assert cls.__name__ == "Int8ReduceScatter" and cls.__module__ == "agoq.gradients.fsdp"
    assert cls(block=128).spec.block == 128
    with pytest.raises(AttributeError):
        fsdp.NoSuchThing  # noqa: B018


# ------------------------------------------------- entries: errors / fallbacks


def _check_error(e: pytest.ExceptionInfo, feature: str, what: str) -> None:
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert feature in msg, msg
    assert what in msg, msg
    assert _TESTED in msg and torch.__version__ in msg, msg


def test_saved_tensor_hook_context_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._functorch._aot_autograd.graph_compile as gc

    monkeypatch.setattr(_compat, "_saved_hook_context_fn", None)
    assert _compat.saved_tensor_hook_context() is None  # eager: resolved, no node info
    monkeypatch.setattr(_compat, "_saved_hook_context_fn", None)
    monkeypatch.delattr(gc, "_get_saved_tensor_hook_context")
    with pytest.warns(RuntimeWarning, match="compiled activation quantization") as w:
        assert _compat.saved_tensor_hook_context() is None
    assert _TESTED in str(w[0].message) and "eager path" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert _compat.saved_tensor_hook_context() is None


def test_top_saved_tensors_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _compat.top_saved_tensors_hooks() is None

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, pack):
        assert _compat.top_saved_tensors_hooks()[0] is pack
    monkeypatch.setattr(_compat, "_top_hooks_fn", None)
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    with pytest.raises(TorchCompatError) as e:
        _compat.top_saved_tensors_hooks()
    _check_error(e, "the activation context", "_top_saved_tensors_default_hooks")


def test_no_static_hooks_filtering(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._functorch.config as cfg

    with _compat.no_static_hooks_filtering():
        assert cfg.saved_tensors_hooks_filtering_mode == "no_static"
    name = "torch._functorch.config"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(TorchCompatError) as e:
        _compat.no_static_hooks_filtering()
    _check_error(e, "compiled activation quantization", "saved_tensors_hooks_filtering_mode")


def test_dtensor_local_and_module_hooks_errors() -> None:
    with pytest.raises(TorchCompatError) as e:
        _compat.dtensor_local(object())
    _check_error(e, "DTensor activations", "DTensor._local_tensor")
    m = nn.Linear(2, 2)
    assert _compat.has_own_hooks(m) is False
    h = m.register_forward_pre_hook(lambda mod, args: None)
    assert _compat.has_own_hooks(m) is True
    h.remove()
    with pytest.raises(TorchCompatError) as e:
        _compat.has_own_hooks(object())
    _check_error(e, "activation rebuild", "_forward_pre_hooks")


def test_tensor_and_buffer_entries() -> None:
    t = torch.ones(3)
    v0 = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == v0 + 1
    assert _compat.view_base(t) is None and _compat.view_base(t[1:]) is t
    bn = nn.BatchNorm1d(2)
    assert _compat.module_buffers(bn)["running_mean"] is bn.running_mean
    for fn, what in [
        (_compat.tensor_version, "Tensor._version"),
        (_compat.view_base, "Tensor._base"),
        (_compat.module_buffers, "Module._buffers"),
    ]:
        with pytest.raises(TorchCompatError) as e:
            fn(object())
        _check_error(e, "agoq", what)


def test_never_rebuilt_types(monkeypatch: pytest.MonkeyPatch) -> None:
    types_ = _compat.never_rebuilt_types()
    assert isinstance(nn.Dropout(), types_) and isinstance(nn.BatchNorm1d(2), types_)
    assert not isinstance(nn.Linear(2, 2), types_)
    _compat.never_rebuilt_types.cache_clear()
    monkeypatch.delattr(nn.modules.dropout, "_DropoutNd")
    try:
        with pytest.raises(TorchCompatError) as e:
            _compat.never_rebuilt_types()
        _check_error(e, "activation rebuild", "torch.nn.modules.dropout._DropoutNd")
    finally:
        _compat.never_rebuilt_types.cache_clear()


def test_global_module_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    hooks = _compat.GlobalModuleHooks(
        lambda m, a: seen.append("pre"), lambda m, a, o: seen.append("post")
    )
    m = nn.Identity()
    try:
        hooks.install()
        keys = hooks._keys
        m(torch.ones(1))
        hooks.remove()
        m(torch.ones(1))
        hooks.install()  # again, under the first keys
        assert hooks._keys == keys
        m(torch.ones(1))
    finally:
        hooks.remove()
    assert seen == ["pre", "post", "pre", "post"]
    _compat._global_hook_dicts.cache_clear()
    monkeypatch.delattr(nn.modules.module, "_global_forward_hooks_always_called")
    try:
        with pytest.raises(TorchCompatError) as e:
            hooks.install()
        _check_error(e, "module tracking", "_global_forward_hooks_always_called")
        assert hooks.installed is False
    finally:
        _compat._global_hook_dicts.cache_clear()


def test_functional_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hasattr(_compat.functional_collectives(), "all_to_all_single")
    monkeypatch.setitem(sys.modules, "torch.distributed._functional_collectives", None)
    with pytest.raises(TorchCompatError) as e:
        _compat.functional_collectives()
    _check_error(e, "int8_all_reduce_functional", "torch.distributed._functional_collectives")


def test_group_timeout_and_backward_callback_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _compat.group_timeout(object(), torch.device("cpu")) is None

    class _Opts:
        _timeout = datetime.timedelta(seconds=7)

    class _Backend:
        options = _Opts()

    class _Group:
        def _get_backend(self, device: torch.device) -> _Backend:
            return _Backend()

    assert _compat.group_timeout(_Group(), torch.device("cpu")) == datetime.timedelta(seconds=7)

    # Outside a backward pass: not queued.
    assert _compat.queue_backward_callback(lambda: None) is False
    ran: list[bool] = []
    queued: list[bool] = []
    x = torch.ones(2, requires_grad=True)
    h = x.register_hook(
        lambda g: queued.append(_compat.queue_backward_callback(lambda: ran.append(True)))
    )
    (x * 2).sum().backward()
    h.remove()
    assert queued == [True] and ran == [True]
    monkeypatch.delattr(torch.autograd.Variable, "_execution_engine")
    assert _compat.queue_backward_callback(lambda: None) is False


def test_work_from_future(monkeypatch: pytest.MonkeyPatch) -> None:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result([torch.ones(1)])
    _compat.work_from_future(fut).wait()
    monkeypatch.delattr(torch._C._distributed_c10d, "_create_work_from_future")
    with pytest.raises(TorchCompatError) as e:
        _compat.work_from_future(fut)
    _check_error(e, "async_op=True", "_create_work_from_future")


def test_fsdp_state_entries_on_a_module_without_fsdp_state() -> None:
    m = nn.Linear(2, 2)
    assert _compat.fsdp_shard_sizes(m) is None  # fallback: plain blocks
    with pytest.raises(TorchCompatError) as e:
        _compat.fsdp_has_replicate_dim(m)
    _check_error(e, "install_int8_all_reduce_hook", "_fsdp_param_groups")


def test_ddp_sync_flag_and_compiled_original() -> None:
    with pytest.raises(TorchCompatError) as e:
        _compat.ddp_sync_flag(nn.Linear(2, 2))
    _check_error(e, "Int8GradStore", "require_forward_param_sync")
    inner = nn.Linear(2, 2)
    wrapper = types.SimpleNamespace(_orig_mod=inner)
    assert _compat.compiled_original(wrapper) is inner  # type: ignore[arg-type]
    assert _compat.compiled_original(inner) is None


def test_is_traceable_wrapper_subclass(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _compat.is_traceable_wrapper_subclass(torch.ones(1)) is False
    name = "torch.utils._python_dispatch"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(TorchCompatError) as e:
        _compat.is_traceable_wrapper_subclass(torch.ones(1))
    _check_error(e, "MemoryReport", "is_traceable_wrapper_subclass")


def test_pipeline_entries_and_the_simulation_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.pipelining import schedules

    from agoq import pipeline

    traced = pipeline._single_stage_actions(schedules.ScheduleGPipe, 3, 4)
    with pytest.raises(TorchCompatError) as e:
        _compat.run_step_microbatches(object())
    _check_error(e, "agoq.pipeline", "_step_microbatches")
    for cls in schedules.ScheduleGPipe.__mro__:
        if "_step_microbatches" in vars(cls):
            monkeypatch.delattr(cls, "_step_microbatches")
    with pytest.warns(RuntimeWarning, match="falling back"):
        simulated = pipeline._single_stage_actions(schedules.ScheduleGPipe, 3, 4)
    assert simulated == traced
    monkeypatch.undo()
    _compat.pipeline_action.cache_clear()
    monkeypatch.delattr(schedules, "_Action")
    try:
        with pytest.raises(TorchCompatError) as e:
            _compat.pipeline_action()
        _check_error(e, "agoq.pipeline", "schedules._Action")
    finally:
        monkeypatch.undo()
        _compat.pipeline_action.cache_clear()
