"""Bad input to every public gradient entry point: a clear TypeError/ValueError naming the
argument, before any collective (issue 10). Single process, no process group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agoq import QuantSpec
from agoq.gradients import (
    Int8AllReduceState,
    Int8GradStore,
    Int8ReduceScatter,
    install_int8_all_reduce_hook,
    install_int8_reduce_scatter,
    int8_all_reduce,
    int8_all_reduce_hook,
    int8_allreduce,
)

STATE_CASES = [
    ({"block": True}, TypeError, "block"),
    ({"block": 100}, ValueError, "block"),
    ({"block": "128"}, TypeError, "block"),
    ({"scale_dtype": "bfloat16"}, TypeError, "scale_dtype"),
    ({"scale_dtype": torch.float16}, ValueError, "scale_dtype"),
    ({"rounding": "up"}, ValueError, "rounding"),
    ({"rounding": 1}, TypeError, "rounding"),
    ({"error_feedback": 1}, TypeError, "error_feedback"),
    ({"error_feedback": "false"}, TypeError, "error_feedback"),
    ({"min_numel": -1}, ValueError, "min_numel"),
    ({"min_numel": True}, TypeError, "min_numel"),
    ({"min_numel": 1.5}, TypeError, "min_numel"),
    ({"seed": False}, TypeError, "seed"),
    ({"model": "ddp"}, TypeError, "model"),
    ({"numerics_check_every": True}, TypeError, "numerics_check_every"),
    ({"guard": 3}, TypeError, "guard"),
]


@pytest.mark.parametrize(("kw", "exc", "name"), STATE_CASES)
def test_hook_state_constructor(kw, exc, name):
    with pytest.raises(exc, match=name):
        Int8AllReduceState(**kw)


def test_hook_state_process_group_and_hook_state():
    with pytest.raises(TypeError, match="process_group"):
        Int8AllReduceState("world")
    with pytest.raises(TypeError, match="state"):
        int8_allreduce(42, None)


def test_int8_all_reduce_arguments():
    t = torch.randn(256)
    with pytest.raises(TypeError, match="tensor"):
        int8_all_reduce([1.0, 2.0])
    with pytest.raises(TypeError, match="floating"):
        int8_all_reduce(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="float64"):
        int8_all_reduce(t.double())
    with pytest.raises(TypeError, match="average"):
        int8_all_reduce(t, average=1)
    with pytest.raises(TypeError, match="spec"):
        int8_all_reduce(t, spec="int8")
    with pytest.raises(ValueError, match="8-bit int"):
        int8_all_reduce(t, spec=QuantSpec(bits=4))
    with pytest.raises(TypeError, match="residual"):
        int8_all_reduce(t, residual=torch.zeros(256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual"):
        int8_all_reduce(t, residual=torch.zeros(10))
    with pytest.raises(ValueError, match="segments"):
        int8_all_reduce(t, segments=[(0, 200), (100, 100)])
    with pytest.raises(ValueError, match="segments"):
        int8_all_reduce(t, segments=[(0, 300)])
    with pytest.raises(TypeError, match="segments"):
        int8_all_reduce(t, segments=[(0, True)])


def test_grad_store_arguments():
    m = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="spec"):
        Int8GradStore(m, spec="int8")
    with pytest.raises(TypeError, match="residual_spec"):
        Int8GradStore(m, residual_spec=8)
    with pytest.raises(ValueError, match="compensation"):
        Int8GradStore(m, compensation="exact")
    with pytest.raises(ValueError, match="compensation"):
        Int8GradStore(m, compensation=None)
    with pytest.raises(TypeError, match="seed"):
        Int8GradStore(m, seed=True)
    with pytest.raises(TypeError, match="not a tensor"):
        Int8GradStore(m.weight)
    with pytest.raises(TypeError, match="tensors"):
        Int8GradStore([1, 2])
    with pytest.raises(TypeError, match="Int8GradStore takes"):
        Int8GradStore(3)
    store = Int8GradStore(m)
    with pytest.raises(TypeError, match="materialize"):
        with store.accumulating(materialize="no"):
            pass
    with pytest.raises(TypeError, match="set_to_none"):
        store.zero_grad(set_to_none=0)
    with pytest.raises(TypeError, match="expected a dict"):
        store.load_state_dict([1])


def test_reduce_scatter_and_install_arguments():
    with pytest.raises(TypeError, match="block"):
        Int8ReduceScatter(block=True)
    with pytest.raises(ValueError, match="min_numel"):
        Int8ReduceScatter(min_numel=True)
    with pytest.raises(TypeError, match="segments"):
        Int8ReduceScatter(segments="12")
    with pytest.raises(ValueError, match="segments"):
        Int8ReduceScatter(segments=[10, -1])
    comm = Int8ReduceScatter()
    with pytest.raises(TypeError, match="float64"):
        comm(torch.empty(4, dtype=torch.float64), torch.empty(8, dtype=torch.float64), None, None)
    with pytest.raises(TypeError, match="tensors"):
        comm([0.0], torch.empty(8), None, None)
    with pytest.raises(TypeError, match="model"):
        install_int8_reduce_scatter("model")
    with pytest.raises(TypeError, match="block"):
        install_int8_reduce_scatter(nn.Linear(2, 2), block=1.0)
    with pytest.raises(TypeError, match="group"):
        int8_all_reduce_hook("replicas")
    with pytest.raises(TypeError, match="group"):
        install_int8_all_reduce_hook(nn.Linear(2, 2), None)
