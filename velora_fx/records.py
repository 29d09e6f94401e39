"""The vocabulary of what velora_fx decided: one ``SiteRecord`` per candidate matmul, one ``GraphSummary`` per
compiled graph, and the byte accounting both use. Plain data, imported by the passes and the runtime alike;
``report.py`` gathers and prints them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = ["SiteRecord", "GraphSummary", "COMPRESSED", "SKIPPED", "input_bytes", "fmt_bytes"]

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
    aside; the quantized estimator: bits per element), the site's own settings in words where its estimator has
    any to say (``settings``: the quantized estimator's bits, group size and rotation, which a per-weight override
    may change), and at which training step its basis was last refreshed (``last_refresh``; ``None``: not since
    this process started).
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
    settings: Optional[str] = None
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
        return (f"{self.graph}{times}: keeps {fmt_bytes(self.saved_bytes)} for backward in {self.saved_tensors} "
                f"tensors, {fmt_bytes(self.projection_bytes)} of them in {self.projections} projections; "
                f"{recompute}{budget}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recomputed"] = [list(kv) for kv in self.recomputed]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphSummary":
        return cls(**dict(data, recomputed=tuple((str(k), int(n)) for k, n in data.get("recomputed", ()))))


def input_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes an input of ``shape`` and ``dtype`` keeps for backward, exactly (what a codec's bytes compare with)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dtype).element_size()


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
