"""What velora_fx did: one ``SiteRecord`` per candidate matmul, gathered into a ``Report``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch

__all__ = ["SiteRecord", "Report", "report", "COMPRESSED", "SKIPPED"]

COMPRESSED = "compressed"
SKIPPED = "skipped"

@dataclass(frozen=True)
class SiteRecord:
    """One candidate matmul: what it would keep for backward, what it keeps, and why.

    ``bytes_before`` is what the input keeps for ``dW`` without velora_fx,
    ``bytes_after`` what it keeps with it (equal when skipped); both ``None``
    while the input's shape is not known yet (an FX-transformed module before
    its first forward).
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

    @property
    def bytes_saved(self) -> int:
        if self.bytes_before is None or self.bytes_after is None:
            return 0
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """An immutable sequence of ``SiteRecord``; ``str()`` is a table with totals.

    Example::

        >>> print(velora_fx.report(gm))            # doctest: +SKIP
        >>> velora_fx.report(gm).bytes_saved        # doctest: +SKIP
    """

    def __new__(cls, records: Iterable[SiteRecord] = ()):
        return super().__new__(cls, records)

    @property
    def compressed(self) -> "Report":
        return Report(r for r in self if r.status == COMPRESSED)

    @property
    def skipped(self) -> "Report":
        return Report(r for r in self if r.status == SKIPPED)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before or 0 for r in self)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after or 0 for r in self)

    @property
    def bytes_saved(self) -> int:
        return sum(r.bytes_saved for r in self)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self]

    def __str__(self) -> str:
        header = ("graph", "node", "weight", "input", "d", "kept before", "kept after", "status", "reason")
        rows = [
            (
                r.graph,
                r.node,
                r.weight,
                "?" if r.input_shape is None else "x".join(map(str, r.input_shape)) + f" {r.dtype}",
                "-" if r.sub_token_size is None else str(r.sub_token_size),
                _fmt_bytes(r.bytes_before),
                _fmt_bytes(r.bytes_after),
                r.status,
                r.reason,
            )
            for r in self
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append(
            f"{len(self.compressed)} compressed, {len(self.skipped)} skipped; "
            f"kept for dW: {_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)} "
            f"(saved {_fmt_bytes(self.bytes_saved)})"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report({len(self)} sites: {len(self.compressed)} compressed, saved {_fmt_bytes(self.bytes_saved)})"


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

    return Report([*fx.records(obj), *runtime.records(obj)])
