"""Exact byte accounting of saved activations and its printable report."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ._compat import is_traceable_wrapper_subclass


@dataclass
class Row:
    """What one (module, kind) saved: counts and exact bytes."""

    saves: int = 0
    tensors: int = 0
    elements: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0
    modes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Storage formats of the distinct tensors (e.g. "fp4_e2m1/128", "bfloat16"): counts.
    formats: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: Row) -> None:
        """Accumulate ``other`` into this row."""
        self.saves += other.saves
        self.tensors += other.tensors
        self.elements += other.elements
        self.original_bytes += other.original_bytes
        self.stored_bytes += other.stored_bytes
        for k, v in other.modes.items():
            self.modes[k] += v
        for k, v in other.formats.items():
            self.formats[k] += v

    @property
    def bits(self) -> float:
        """Stored bits per element of the unique tensors saved."""
        return 8 * self.stored_bytes / self.elements if self.elements else 0.0


@dataclass
class MemoryReport:
    """Per (FQN, kind): tensors saved for backward, original and stored bytes.

    ``saves`` counts pack calls; ``tensors``/bytes count each distinct tensor once (a tensor
    saved by three GEMMs costs its bytes once, as it does without agoq). Modes: ``quantized``,
    ``kept``, ``recomputed`` (0 bytes), ``rebuilt`` (a copy of a parameter, e.g. autocast's
    weight cast, rebuilt from the parameter: 0 bytes), ``dedup`` (a repeat save of a stored
    tensor at the same version).
    ``live_bytes`` / ``peak_bytes``: bytes held right now / at most at once, counted from
    each stored tensor's creation until autograd frees it (e.g. a pipeline stage's peak
    over a schedule with several micro-batches in flight).
    """

    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    live_bytes: int = 0
    peak_bytes: int = 0

    def hold(self, nbytes: int) -> None:
        """Account ``nbytes`` now held for backward (see :meth:`release`)."""
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, nbytes: int) -> None:
        """The storage of an earlier :meth:`hold` was freed (autograd dropped it)."""
        self.live_bytes -= nbytes

    def record(
        self,
        fqn: str,
        kind: str,
        mode: str,
        elements: int,
        original: int,
        stored: int,
        fmt: str = "",
    ) -> None:
        """Account one pack call (elements/bytes are 0 for a repeat save); ``fmt`` names
        the storage format of a kept or quantized tensor."""
        row = self.rows.get((fqn, kind))
        if row is None:  # not setdefault: a Row per call is the cost of a pack hook
            row = self.rows[(fqn, kind)] = Row()
        row.saves += 1
        row.modes[mode] += 1
        if mode != "dedup":
            row.tensors += 1
            row.elements += elements
            row.original_bytes += original
            row.stored_bytes += stored
            if fmt:
                row.formats[fmt] += 1

    def clear(self) -> None:
        """Forget everything recorded so far (the live count keeps running)."""
        self.rows.clear()
        self.peak_bytes = self.live_bytes

    def total(self, prefix: str = "") -> Row:
        """Sum over FQNs starting with ``prefix``."""
        out = Row()
        for (fqn, _), row in self.rows.items():
            if fqn.startswith(prefix):
                out.add(row)
        return out

    def by_kind(self, prefix: str = "") -> dict[str, Row]:
        """Rows summed per kind (over FQNs starting with ``prefix``)."""
        out: dict[str, Row] = defaultdict(Row)
        for (fqn, kind), row in self.rows.items():
            if fqn.startswith(prefix):
                out[kind].add(row)
        return dict(out)

    def by_fqn(self) -> dict[str, Row]:
        """Rows summed per FQN."""
        out: dict[str, Row] = defaultdict(Row)
        for (fqn, _), row in self.rows.items():
            out[fqn].add(row)
        return dict(out)

    @property
    def original_bytes(self) -> int:
        """Bytes the saved tensors would take unquantized."""
        return self.total().original_bytes

    @property
    def stored_bytes(self) -> int:
        """Bytes agoq actually holds for them."""
        return self.total().stored_bytes

    def table(self, *, group: str = "fqn", unit: int | None = None) -> str:
        """A fixed-width table, one line per FQN (``group="fqn"``) or per kind.

        With ``unit`` (bytes), bytes are also shown in that unit (e.g. U = b*s*h*2).
        """
        rows = self.by_fqn() if group == "fqn" else self.by_kind()
        if group == "fqn":
            kinds = {fqn: kind for (fqn, kind) in self.rows}
            rows = {f"{fqn} [{kinds[fqn]}]": r for fqn, r in rows.items()}
        width = max([len(k) for k in rows] + [10])
        head = f"{'module' if group == 'fqn' else 'kind':<{width}}  saves  tensors  original MiB  stored MiB  bits  modes"
        lines = [head, "-" * len(head)]

        def fmt(name: str, r: Row) -> str:
            extra = (
                f"  ({r.original_bytes / unit:.2f}U -> {r.stored_bytes / unit:.2f}U)"
                if unit
                else ""
            )
            modes = ",".join(f"{k}:{v}" for k, v in sorted(r.modes.items()))
            return (
                f"{name:<{width}}  {r.saves:5d}  {r.tensors:7d}  {r.original_bytes / 2**20:12.3f}"
                f"  {r.stored_bytes / 2**20:10.3f}  {r.bits:4.1f}  {modes}{extra}"
            )

        for name in sorted(rows):
            lines.append(fmt(name, rows[name]))
        lines.append("-" * len(head))
        lines.append(fmt("total", self.total()))
        return "\n".join(lines)

    def explain(self, prefix: str = "", *, unit: int | None = None) -> str:
        """One line per (module, kind) saving for backward: what each got, e.g.
        ``model.layers.0.self_attn.q_norm  qk_norm_input  quantized:1 recomputed:3
        int8/128  0.26U``, so a user sees what a new model gets without reading code.
        Modes: quantized, kept, recomputed (rebuilt from stored inputs, 0 bytes), rebuilt
        (a parameter copy), dedup (a repeat save)."""
        keys = sorted(k for k in self.rows if k[0].startswith(prefix))
        width = max([len(f) for f, _ in keys] + [6])
        kwidth = max([len(k) for _, k in keys] + [4])
        size = "stored" if unit is None else "stored (U)"
        lines = [f"{'module':<{width}}  {'kind':<{kwidth}}  {'modes':<34}  {'formats':<28}  {size}"]
        for fqn, kind in keys:
            r = self.rows[(fqn, kind)]
            modes = " ".join(f"{m}:{n}" for m, n in sorted(r.modes.items()))
            fmts = " ".join(sorted(r.formats)) or "-"
            amount = f"{r.stored_bytes / unit:.2f}U" if unit else f"{r.stored_bytes} B"
            lines.append(f"{fqn:<{width}}  {kind:<{kwidth}}  {modes:<34}  {fmts:<28}  {amount}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: a wrapper subclass (a DTensor, FSDP2's sharded
    parameters) has no storage of its own, its inner tensors do."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    attrs, _ = t.__tensor_flatten__()
    inners = [getattr(t, a) for a in attrs]
    return [p for inner in inners if isinstance(inner, torch.Tensor) for p in _plain_tensors(inner)]


def _held_storages(t: torch.Tensor) -> list[tuple[int, int]]:
    """(data pointer, bytes) of each storage behind ``t`` that holds memory now. A storage
    resized to 0 (FSDP2's unsharded parameters after ``reshard_after_forward``) holds
    nothing, and its pointer identifies nothing."""
    out = []
    for plain in _plain_tensors(t):
        storage = plain.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes:
            out.append((storage.data_ptr(), nbytes))
    return out


def compiled_saved_bytes(output: torch.Tensor, model: torch.nn.Module | None = None) -> int:
    """Bytes the ``torch.compile``d regions of ``output``'s autograd graph hold for backward.

    Parameters and buffers of ``model`` are excluded (they live anyway), in whatever form
    they are at the time of the call: plain, DTensor shards, or FSDP2's unsharded copies
    (freed after forward with ``reshard_after_forward``, so they count 0 bytes). Use it to
    see what compiled regions store: with agoq's hooks inlined, no Python hook runs at run
    time, so the context's report cannot count these saves. (Reads the compiled autograd
    nodes' saved tensors directly; torch's MemTracker cannot run around fullgraph-compiled
    code.)
    """
    statics: set[int] = set()
    if model is not None:
        statics = {
            ptr for t in [*model.parameters(), *model.buffers()] for ptr, _ in _held_storages(t)
        }
    seen: set = set()
    storages: set[int] = set()
    todo = [output.grad_fn]
    total = 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            for t in node.saved_tensors:
                for ptr, nbytes in _held_storages(t):
                    if ptr not in statics and ptr not in storages:
                        storages.add(ptr)
                        total += nbytes
        todo.extend(f for f, _ in node.next_functions)
    return total
