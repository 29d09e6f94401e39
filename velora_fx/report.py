"""What velora_fx did: one ``SiteRecord`` per candidate matmul, gathered into a ``Report``."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch

__all__ = ["SiteRecord", "GraphSummary", "Report", "report", "COMPRESSED", "SKIPPED"]

COMPRESSED = "compressed"
SKIPPED = "skipped"

@dataclass(frozen=True)
class SiteRecord:
    """One candidate matmul: what it would keep for backward, what it keeps, and why.

    ``bytes_before`` is what the input keeps for ``dW`` without velora_fx,
    ``bytes_after`` what it keeps with it (equal when skipped); both ``None``
    while the input's shape is not known yet (an FX-transformed module before
    its first forward). A compressed site also says which ``estimator`` keeps
    its input, in how many scalars ``per_token`` (the sub-token size ``d``
    aside; the quantized estimator: bits per element), and at which training step its basis was last refreshed
    (``last_refresh``; ``None``: not since this process started).
    """

    graph: str
    node: str
    weight: str
    status: str
    reason: str
    input_shape: Optional[tuple[int, ...]] = None
    dtype: Optional[str] = None
    sub_token_size: Optional[int] = None
    bytes_before: Optional[int] = None
    bytes_after: Optional[int] = None
    estimator: Optional[str] = None
    per_token: Optional[float] = None
    last_refresh: Optional[int] = None

    @property
    def bytes_saved(self) -> int:
        if self.bytes_before is None or self.bytes_after is None:
            return 0
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GraphSummary:
    """What the min-cut partitioner chose for one compiled graph (compile backend only).

    ``saved_bytes`` are the activations its forward keeps for backward
    (parameters excluded), sized for the inputs it was compiled with
    (symbolic sizes: their example values); ``projection_bytes`` of them are
    velora_fx's projections ``p``. ``recomputed`` lists the forward ops that
    backward recomputes instead of keeping their results (view-like ops left
    out), as ``(op, count)``. ``instances``: how many sets of parameters ran
    through the graph (blocks of one class share a graph), so the model keeps
    ``saved_bytes × instances``.
    """

    graph: str
    saved_bytes: int
    saved_tensors: int
    projection_bytes: int
    projections: int
    recomputed: tuple[tuple[str, int], ...] = ()
    memory_budget: Optional[float] = None
    instances: int = 1

    @property
    def recomputed_ops(self) -> int:
        return sum(n for _, n in self.recomputed)

    def describe(self) -> str:
        times = f" (x{self.instances} instances)" if self.instances > 1 else ""
        budget = f", memory budget {self.memory_budget:g}" if self.memory_budget is not None else ""
        ops = ", ".join(f"{op} x{n}" for op, n in self.recomputed[:6]) + (", ..." if len(self.recomputed) > 6 else "")
        recompute = f"recomputes {self.recomputed_ops} ops in backward ({ops})" if self.recomputed else "recomputes nothing"
        return (f"{self.graph}{times}: keeps {_fmt_bytes(self.saved_bytes)} for backward in {self.saved_tensors} "
                f"tensors, {_fmt_bytes(self.projection_bytes)} of them in {self.projections} projections; "
                f"{recompute}{budget}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recomputed"] = [list(kv) for kv in self.recomputed]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphSummary":
        return cls(**dict(data, recomputed=tuple((str(k), int(n)) for k, n in data.get("recomputed", ()))))


def kept_bytes(shape: Sequence[int], dtype: torch.dtype, basis: Union[None, int, tuple[int, int]]) -> tuple[int, int]:
    """Bytes an input of ``shape`` keeps for backward: exact, and projected on a basis of shape ``(d, r)`` (an int:
    ``(d, 1)``, VeLoRA's sub-token size)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= int(s)
    before = numel * itemsize
    if basis is None:
        return before, before
    d, r = (basis, 1) if isinstance(basis, int) else basis
    features = int(shape[-1]) if len(shape) else 1
    tokens = numel // features if features else 0
    return before, tokens * (-(-features // d)) * r * itemsize


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Report(tuple):
    """An immutable sequence of ``SiteRecord`` (and, for compiled graphs, one ``GraphSummary`` per graph in
    ``graphs``); ``str()`` is a table for a 100-column terminal, long reasons as numbered notes below it.

    Example::

        >>> print(velora_fx.report(model))          # doctest: +SKIP
        >>> velora_fx.report(model).bytes_saved      # doctest: +SKIP
        >>> velora_fx.report(model).saved_bytes      # what the model keeps for backward per step  # doctest: +SKIP
    """

    graphs: tuple[GraphSummary, ...]

    def __new__(cls, records: Iterable[SiteRecord] = (), graphs: Iterable[GraphSummary] = ()):
        out = super().__new__(cls, records)
        out.graphs = tuple(graphs)
        return out

    @property
    def compressed(self) -> "Report":
        return Report((r for r in self if r.status == COMPRESSED), self.graphs)

    @property
    def skipped(self) -> "Report":
        return Report((r for r in self if r.status == SKIPPED), self.graphs)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before or 0 for r in self)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after or 0 for r in self)

    @property
    def bytes_saved(self) -> int:
        return sum(r.bytes_saved for r in self)

    @property
    def saved_bytes(self) -> Optional[int]:
        """Bytes the model keeps for backward in one step, over all its compiled graphs (``None``: not known)."""
        return sum(g.saved_bytes * g.instances for g in self.graphs) if self.graphs else None

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self]

    def format(self, width: int = 100) -> str:
        """The table, at most ``width`` columns wide but for very long weight names."""
        notes: dict[str, int] = {}
        rows_by_graph: dict[str, list[tuple[str, ...]]] = {}
        for r in self:
            note = "" if r.reason == COMPRESSED else f" [{notes.setdefault(r.reason, len(notes) + 1)}]"
            rows_by_graph.setdefault(r.graph, []).append((
                _ellipsize(r.weight, 44),
                "?" if r.input_shape is None else "x".join(map(str, r.input_shape)) + f" {_short_dtype(r.dtype)}",
                "-" if r.per_token is None else f"{r.per_token:g}",
                f"{_fmt_bytes(r.bytes_before)} -> {_fmt_bytes(r.bytes_after)}",
                r.status + note,
            ))  # fmt: skip
        header = ("weight", "input", "k", "kept for dW", "status")
        rows = [row for group in rows_by_graph.values() for row in group]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = textwrap.wrap(
            f"velora_fx: {len(self.compressed)} of {len(self)} sites compressed; the inputs kept for their weight "
            f"gradients: {_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)} "
            f"(saved {_fmt_bytes(self.bytes_saved)})", width, subsequent_indent="    "
        ) + self._estimators(width) + ["", line(header), line(["-" * w for w in widths])]  # fmt: skip
        for graph, group in rows_by_graph.items():
            if len(rows_by_graph) > 1:
                out.append(f"{graph}:")
            out.extend(line(row) for row in group)
        if notes:
            out.append("")
            for reason, k in notes.items():
                out.extend(textwrap.wrap(f"[{k}] {reason}", width, subsequent_indent="    ", break_on_hyphens=False))
        if self.graphs:
            out.append("")
            out.extend(textwrap.fill(g.describe(), width, subsequent_indent="    ") for g in self.graphs)
            out.append(f"kept for backward per step, all graphs: {_fmt_bytes(self.saved_bytes)}")
        return "\n".join(out)

    def _estimators(self, width: int) -> list[str]:
        """One line per estimator in use: which, and when the bases were last refreshed."""
        out = []
        for name in dict.fromkeys(r.estimator for r in self.compressed if r.estimator):
            recs = [r for r in self.compressed if r.estimator == name]
            refreshed = [r.last_refresh for r in recs if r.last_refresh is not None]
            when = f"; last refresh at step {max(refreshed)}" if refreshed else ""
            k = ("bits kept per element (its code and its share of the group's scales), relative to the input's "
                 "dtype" if name == "quantized" else "scalars kept per token")  # fmt: skip
            out += textwrap.wrap(f"estimator {name}: {len(recs)} sites; k = {k}{when}", width)
        return out

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"Report({len(self)} sites: {len(self.compressed)} compressed, saved {_fmt_bytes(self.bytes_saved)})"


def _ellipsize(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width // 3] + "…" + text[-(width - width // 3 - 1) :]


def _short_dtype(dtype: Optional[str]) -> str:
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}.get(dtype or "", dtype or "")


def report(obj: Any) -> Report:
    """Every candidate site velora_fx saw in ``obj``, with status, reason and bytes.

    Weights are named as in ``obj.named_parameters()`` (``torch.compile``'s
    ``_orig_mod.`` left out), whichever way ``obj`` was compiled: whole,
    per block, under DDP or FSDP2 (FSDP2 and per-block compile need
    ``velora_fx.prepare(model)`` first: see README.md).

    Args:
        obj: a GraphModule returned by ``velora_fx.transform``, or a model
            compiled with ``velora_fx.backend`` (the ``torch.compile`` result,
            the original module, or a wrapper around it); records appear once
            a graph has run with grad.

    Returns:
        A ``Report``; ``print`` it for a table.

    Example::

        >>> gm = velora_fx.transform(torch.fx.symbolic_trace(model))   # doctest: +SKIP
        >>> print(velora_fx.report(gm))                                 # doctest: +SKIP
    """
    from . import fx, runtime  # they import this module

    records, graphs = runtime.records(obj)
    # a transformed GraphModule under torch.compile: the FX route owns its sites, sized with the compiled inputs
    fx_records = fx.records(obj, {r.weight: (r.input_shape, r.dtype) for r in records if r.input_shape})
    owned = {r.weight for r in fx_records}
    return Report([*fx_records, *(r for r in records if r.weight not in owned)], graphs)
