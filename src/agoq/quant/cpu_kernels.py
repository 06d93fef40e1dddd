"""The fused CPU codec kernel (``cpu_kernels.c``), built once per machine and loaded with ctypes.

Why C and not the reference compiled by inductor: inductor splits the block-absmax reduction
and the encode into two loops over the whole tensor (the scale is also an output), so the
input is read from memory twice, and its masked tail handling (a dynamic row count, or a
padded flat input) costs int64 index vectors per element: 0.25-0.4x of a copy for int8 and
0.04x for fp4 on bf16. Compiled variants also cost 6-14 s each to build, once per process
and per shape class, which is what made the first attempt erratic inside benchmarks (the
first timed calls compiled). The C kernel does one pass per L1-resident block and builds
in about a second, once per machine (cached under ``$AGOQ_CACHE_DIR``, default
``~/.cache/agoq``).

It is compiled without fast-math, so every float operation is the IEEE one of the torch
reference in the same order, and the output bits are the reference's. When no C compiler
is available (or ``AGOQ_CPU_KERNEL=0``), :func:`supports` is False and the reference runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import codec
from .ops import row_layout
from .spec import QuantSpec

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FORMATS = {"int": 0, "fp4_e2m1": 1, "fp8_e4m3": 2}
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-fno-trapping-math",
]
# Below this many elements (~0.5 ms of work) the kernel runs on one thread: an OpenMP team
# on a busy machine (other ranks, data loaders) waits for a descheduled member at its
# barrier, which measured 6 ms for 0.14 ms of work on a loaded 2-core machine.
_PARALLEL_MIN = 1 << 20

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("AGOQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agoq"
    )
    return Path(root)


def _machine_key(compiler: str) -> str:
    # -march=native: a library built on another CPU model must not be reused here.
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    h = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        " ".join(_FLAGS).encode(),
        compiler.encode(),
        flags.encode(),
    ):
        h.update(part)
    return h.hexdigest()[:16]


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) found; set CC")
    target = _cache_dir() / f"agoq_cpu_{_machine_key(compiler)}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build to a private name and rename: ranks of one job may build at the same time.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.agoq_quantize.argtypes = [
        ptr,
        i32,
        i64,
        i64,
        ptr,
        ptr,
        i64,
        i64,
        i32,
        i32,
        i32,
        i32,
        f32,
        i32,
    ]
    lib.agoq_quantize.restype = i32
    lib.agoq_dequantize.argtypes = [
        ptr,
        i64,
        ptr,
        i64,
        i32,
        ptr,
        i32,
        i64,
        i64,
        i32,
        i32,
        i32,
        ptr,
        f32,
        i32,
    ]
    lib.agoq_dequantize.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None if it cannot be built."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("AGOQ_CPU_KERNEL", "1") == "0":
                _error = "disabled by AGOQ_CPU_KERNEL=0"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, read-only cache...: run the reference
                    _error = f"{type(exc).__name__}: {exc}"
                    warnings.warn(
                        f"agoq: the fused CPU codec kernel is unavailable ({_error}); "
                        "using the slower torch reference (same results)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _lib


def unavailable_reason() -> str:
    """Why the fused CPU kernel is not used (empty string if it is)."""
    library()
    return _error or ""


def supports(spec: QuantSpec, dtype: torch.dtype) -> bool:
    """True when the fused CPU kernel runs ``spec`` for ``dtype`` tensors.

    Stochastic rounding of the minifloat formats stays on the reference."""
    if dtype not in _DTYPES:
        return False
    if spec.rounding == "stochastic" and spec.format != "int":
        return False
    return library() is not None


def _threads(numel: int) -> int:
    return torch.get_num_threads() if numel >= _PARALLEL_MIN else 1


@functools.lru_cache(maxsize=256)
def _consts(spec: QuantSpec) -> tuple:
    """The kernel's per-spec arguments, computed once (this path runs per saved tensor)."""
    lut = codec.code_values(spec, "cpu") if spec.format != "int" else None
    return (
        spec.bits,
        _FORMATS[spec.format],
        spec.block,
        int(spec.scale_dtype == torch.bfloat16),
        spec.max_level,
        lut,  # kept alive here: the kernel reads it through its pointer
        lut.data_ptr() if lut is not None else None,
    )


_FMAX = {dt: codec.finite_max(dt) for dt in _DTYPES}


def quantize(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None) -> torch.Tensor:
    """The wire (rows, row_bytes) of contiguous ``x`` (rows, row_elems); see agoq.quant.ops."""
    rows, n = x.shape
    lay = row_layout(spec, n)
    wire = torch.empty((rows, lay.row_bytes), dtype=torch.uint8)
    if rows == 0 or n == 0:
        return wire.zero_()
    bits, fmt, block, bf16, maxv, _, _ = _consts(spec)
    rc = _lib.agoq_quantize(
        x.data_ptr(),
        _DTYPES[x.dtype],
        rows,
        n,
        noise.data_ptr() if noise is not None else None,
        wire.data_ptr(),
        lay.row_bytes,
        lay.scale_offset,
        bits,
        fmt,
        block,
        bf16,
        maxv,
        _threads(rows * n),
    )
    if rc != 0:
        raise RuntimeError(f"agoq CPU quantize kernel failed (code {rc}) for {spec}")
    return wire


def dequantize(
    payload: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, n: int, out: torch.Tensor
) -> None:
    """Write rows (rows, n) into contiguous ``out`` from row-strided payload and scales views."""
    rows = payload.shape[0]
    if rows == 0 or n == 0:
        return
    if payload.stride(-1) != 1 and payload.shape[-1] > 1:
        payload = payload.contiguous()
    if scales.stride(-1) != 1 and scales.shape[-1] > 1:
        scales = scales.contiguous()
    bits, fmt, block, _, _, _, lut_ptr = _consts(spec)
    rc = _lib.agoq_dequantize(
        payload.data_ptr(),
        payload.stride(0) if rows > 1 else 0,
        scales.data_ptr(),
        scales.stride(0) if rows > 1 else 0,
        int(scales.dtype == torch.bfloat16),
        out.data_ptr(),
        _DTYPES[out.dtype],
        rows,
        n,
        bits,
        fmt,
        block,
        lut_ptr,
        _FMAX[out.dtype],
        _threads(rows * n),
    )
    if rc != 0:
        raise RuntimeError(f"agoq CPU dequantize kernel failed (code {rc}) for {spec}")


__all__ = ["dequantize", "library", "quantize", "supports", "unavailable_reason"]
