"""Bad input to the codec: quantize, dequantize, QuantSpec, Packed (issue 10, class 4).

Each refused input must raise an error naming the problem; a tampered or mismatched
``Packed`` must never decode into a tensor of the wrong values.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from agoq import QuantSpec, dequantize, quantize
from agoq.quant import Packed

SPEC = QuantSpec(bits=4, format="int", block=32)


def _packed(n: int = 100, spec: QuantSpec = SPEC) -> tuple[torch.Tensor, Packed]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return x, quantize(x, spec)


# --------------------------------------------------------------------------- float64


@pytest.mark.parametrize("values", [[1e-50, 2e-50], [1e300, -1e300], [0.5, -0.25]])
def test_float64_is_refused_not_squeezed_through_fp32(values):
    # The old codec returned 0 for 1e-50 and NaN for 1e300, silently.
    x = torch.tensor(values * 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        quantize(x, QuantSpec(bits=8, format="int", block=64))


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(64),  # int64
        torch.ones(64, dtype=torch.bool),
        torch.ones(64, dtype=torch.complex64),
        [1.0, 2.0],
    ],
    ids=["int64", "bool", "complex64", "list"],
)
def test_non_floating_inputs_are_refused(x):
    with pytest.raises(TypeError):
        quantize(x, SPEC)


def test_spec_and_backend_are_checked():
    x = torch.randn(64)
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize(x, {"bits": 4})
    with pytest.raises(ValueError, match="backend"):
        quantize(x, SPEC, backend="cuda")
    with pytest.raises(ValueError, match="meta"):
        quantize(torch.empty(64, device="meta"), SPEC)


# ------------------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": True}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"block": 128.0}, "block"),
        ({"block": True}, "block"),
        ({"format": 4}, "format"),
        ({"format": ["int"]}, "format"),
        ({"rounding": None}, "rounding"),
        ({"scale_dtype": "float32"}, "scale_dtype"),
    ],
)
def test_quantspec_wrong_types_are_type_errors(kwargs, field):
    with pytest.raises(TypeError, match=f"QuantSpec.{field}"):
        QuantSpec(**kwargs)


# Bad QuantSpec values (ValueError naming the field): tests/test_quant_codec.py::
# test_invalid_spec_names_the_field.


# ------------------------------------------------------------- Packed / dequantize


def _tamper(p: Packed, **changes) -> Packed:
    return dataclasses.replace(p, **changes)


def test_valid_packed_still_decodes_within_the_bound():
    x, p = _packed()
    y = dequantize(p)
    step = p.scales.repeat_interleave(SPEC.block)[: x.numel()]
    assert ((y - x).abs() <= 0.5 * step + 1e-7).all()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: {"payload": p.payload[:-1]}, "payload"),  # truncated
        (lambda p: {"payload": torch.cat([p.payload, p.payload[:16]])}, "payload"),  # extra
        (lambda p: {"payload": p.payload.to(torch.int8)}, "payload"),
        (lambda p: {"payload": p.payload.float()}, "payload"),
        (lambda p: {"payload": p.payload.view(2, -1)}, "payload"),
        (lambda p: {"scales": p.scales[:-1]}, "scales"),
        (lambda p: {"scales": torch.cat([p.scales, p.scales])}, "scales"),
        (lambda p: {"scales": p.scales.to(torch.bfloat16)}, "scales"),
        (lambda p: {"scales": p.scales.double()}, "scales"),
        (lambda p: {"scales": torch.empty(p.scales.shape, device="meta")}, "scales"),
        (lambda p: {"shape": torch.Size([200])}, "payload"),  # more elements than stored
        (lambda p: {"shape": torch.Size([50])}, "payload"),  # fewer
        (lambda p: {"shape": torch.Size([10, 10]), "stride": (1,)}, "stride"),
        (lambda p: {"shape": torch.Size([10, 10]), "stride": (1, 1)}, "stride"),
        (lambda p: {"shape": torch.Size([10, 10]), "stride": (20, 1)}, "stride"),
        (lambda p: {"dtype": torch.int32}, "dtype"),
        (lambda p: {"dtype": torch.float64}, "dtype"),
        (lambda p: {"spec": QuantSpec(bits=8, format="int", block=32)}, "payload"),
        (lambda p: {"spec": QuantSpec(bits=4, format="int", block=16)}, "payload"),
        (lambda p: {"spec": QuantSpec(bits=4, format="int", block=64)}, "scales"),
        (lambda p: {"spec": QuantSpec(4, "int", 32, scale_dtype=torch.bfloat16)}, "scales"),
    ],
)
def test_tampered_or_mismatched_packed_is_refused(change, field):
    _, p = _packed()
    bad = _tamper(p, **change(p))
    with pytest.raises(ValueError, match=rf"Packed\.{field}"):
        dequantize(bad)


def test_packed_with_a_non_spec_or_non_tensor_is_refused():
    _, p = _packed()
    with pytest.raises(TypeError, match="spec"):
        dequantize(_tamper(p, spec="int4"))
    with pytest.raises(TypeError, match="payload"):
        dequantize(_tamper(p, payload=p.payload.tolist()))
    with pytest.raises(TypeError, match="Packed"):
        dequantize(p.payload)


def test_validation_reads_no_data():
    # Metadata only: a Packed whose tensors are on the meta device (no data at all) passes
    # validation; only decoding would need the bytes.
    _, p = _packed()
    meta = _tamper(p, payload=p.payload.to("meta"), scales=p.scales.to("meta"))
    meta.validate()


def test_expanded_tensor_roundtrips():
    # A stride-0 (expanded) tensor: the old restore crashed writing into overlapping memory.
    base = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    x = base.expand(8, 64)
    y = dequantize(quantize(x, SPEC))
    assert y.shape == x.shape
    ref = dequantize(quantize(x.contiguous(), SPEC))
    assert torch.equal(y, ref)


def test_packed_built_inside_torch_compile_still_decodes():
    # The compiled hook path builds Packed in traced code: validation must trace.
    spec = QuantSpec(bits=4, format="fp4_e2m1", block=32)

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        p = quantize(x, spec, backend="torch")
        return dequantize(Packed(p.payload, p.scales, spec, p.shape, p.stride, x.dtype, True))

    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), dequantize(quantize(x, spec)))
