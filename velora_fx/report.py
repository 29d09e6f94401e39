"""What velora_fx did, for the user: ``report(obj)`` gathers the records of both routes into a ``Report``."""

from __future__ import annotations

import textwrap
from collections import Counter
from typing import Any, Iterable, Optional

from . import fx, runtime
from .records import COMPRESSED, SKIPPED, GraphSummary, SiteRecord, fmt_bytes

__all__ = ["SiteRecord", "GraphSummary", "Report", "report", "COMPRESSED", "SKIPPED"]


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
                f"{fmt_bytes(r.bytes_before)} -> {fmt_bytes(r.bytes_after)}",
                r.status + note,
            ))  # fmt: skip
        header = ("weight", "input", "k", "kept for dW", "status")
        rows = [row for group in rows_by_graph.values() for row in group]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = textwrap.wrap(
            f"velora_fx: {len(self.compressed)} of {len(self)} sites compressed; the inputs kept for their weight "
            f"gradients: {fmt_bytes(self.bytes_before)} -> {fmt_bytes(self.bytes_after)} "
            f"(saved {fmt_bytes(self.bytes_saved)})", width, subsequent_indent="    "
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
            out.append(f"kept for backward per step, all graphs: {fmt_bytes(self.saved_bytes)}")
        return "\n".join(out)

    def _estimators(self, width: int) -> list[str]:
        """One line per estimator in use: which, how many sites at each of its settings (a per-weight override shows
        as its own count), and when the bases were last refreshed."""
        out = []
        for name in dict.fromkeys(r.estimator for r in self.compressed if r.estimator):
            recs = [r for r in self.compressed if r.estimator == name]
            refreshed = [r.last_refresh for r in recs if r.last_refresh is not None]
            when = f"; last refresh at step {max(refreshed)}" if refreshed else ""
            k = ("bits kept per element (its code and its share of the group's scales), relative to the input's "
                 "dtype" if name == "quantized" else "scalars kept per token")  # fmt: skip
            counts = Counter(r.settings for r in recs)
            at = "; ".join(f"{_sites(n)} at {s}" for s, n in counts.items() if s) if any(counts) else _sites(len(recs))
            out += textwrap.wrap(f"estimator {name}: {at}; k = {k}{when}", width, subsequent_indent="    ",
                                 break_on_hyphens=False)
        return out

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"Report({len(self)} sites: {len(self.compressed)} compressed, saved {fmt_bytes(self.bytes_saved)})"


def _sites(n: int) -> str:
    return f"{n} site{'s' * (n != 1)}"


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
    records, graphs = runtime.records(obj)
    # a transformed GraphModule under torch.compile: the FX route owns its sites, sized with the compiled inputs
    fx_records = fx.records(obj, {r.weight: (r.input_shape, r.dtype) for r in records if r.input_shape})
    owned = {r.weight for r in fx_records}
    return Report([*fx_records, *(r for r in records if r.weight not in owned)], graphs)
