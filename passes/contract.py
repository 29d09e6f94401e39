"""The contract between the compile backend and the joint-graph pass: what the backend tells the pass, and what
the pass tells back.

The backend adds one input per projection basis to the Dynamo graph and
describes every trainable parameter input in a ``ParamSlot``; the pass
(``passes/joint_graph.py``) plans and rewrites the joint graph from that
``GraphSpec`` and the ``RewriteOptions`` alone (the codec, not the config),
and returns one ``PlannedSite`` per matmul site. A
``PlannedSite`` names weights by *slot*, not by name: the same compiled graph
serves every instance of a module class, and the runtime renders the record
with each instance's names (``render``).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from velora_fx.codec import Estimator as Codec
from velora_fx.records import SiteRecord

__all__ = ["ParamSlot", "GraphSpec", "RewriteOptions", "PlannedSite", "escape"]


@dataclass(frozen=True)
class ParamSlot:
    """A trainable parameter input of the graph and, when it is compressed, its projection basis.

    ``primal`` and ``basis_primal`` are positions among the graph's inputs.
    ``basis_primal is None`` means the parameter keeps its input exactly
    (``reason`` says why). ``basis_shape`` is the codec's: for a projection
    ``(d, r)``, the sub-token size and the coordinates kept per sub-token
    (VeLoRA: ``(D / num_groups, 1)``); quantized, ``(group_size, bits, rotated, stochastic)``.
    ``leader`` is the slot whose basis this one uses when both weights read
    the same input (NOTE [one basis per input] in ``velora_fx/runtime.py``).
    ``refreshed``: the basis of this step is computed inside the graph
    (``init="batch_average"`` / ``"ema"``) and marked with ``DIRECTION_OP``.
    """

    primal: int
    name: str
    basis_primal: Optional[int] = None
    features: Optional[int] = None
    basis_shape: Optional[tuple[int, ...]] = None
    refreshed: bool = False
    reason: str = ""
    leader: Optional[int] = None

    @property
    def sub_token_size(self) -> Optional[int]:
        return None if self.basis_shape is None else self.basis_shape[0]


@dataclass(frozen=True)
class GraphSpec:
    """The inputs of one graph as the backend built them: how many, and the parameter slots."""

    name: str
    num_inputs: int
    slots: tuple[ParamSlot, ...]

    def key_dict(self) -> dict[str, Any]:
        """What the rewrite depends on: neither the graph's name nor the weights' names (records are rendered)."""
        slots = [dataclasses.replace(s, name="") for s in self.slots]
        return {"num_inputs": self.num_inputs, "slots": [dataclasses.asdict(s) for s in slots]}


@dataclass(frozen=True)
class RewriteOptions:
    """How the pass rewrites: the codec (what forward keeps, how backward forms ``dW``), the scale of ``dW``, the
    smallest stored input worth compressing, and ``key``: everything the rewrite depends on as JSON-able data (the
    config's ``to_dict()``), for the cache key."""

    codec: Codec
    scale: float
    min_saved_bytes: int
    key: Any

    def codec_sources(self) -> tuple[str, ...]:
        """The source files of the codec's classes and of the modules it writes graphs with (a cache key must
        cover them: a codec's code is inlined into the graph)."""
        classes = [c.__module__ for c in type(self.codec).__mro__ if c.__module__.startswith("velora_fx")]
        modules = dict.fromkeys([*classes, *self.codec.source_modules])
        return tuple(sys.modules[m].__file__ for m in modules)


def escape(text: str) -> str:
    """``text`` made safe to embed in a ``PlannedSite.reason`` template (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class PlannedSite:
    """One forward matmul of a plan, naming weights by slot.

    ``reason`` is a ``str.format`` template whose ``{0}``, ``{1}`` … are the
    names of the slots in ``related`` (other weights the reason mentions);
    any other text in it is ``escape``-d.
    """

    slot: int
    node: str
    status: str
    reason: str
    related: tuple[int, ...] = ()
    input_shape: Optional[tuple[int, ...]] = None
    dtype: Optional[str] = None
    sub_token_size: Optional[int] = None
    bytes_before: Optional[int] = None
    bytes_after: Optional[int] = None
    estimator: Optional[str] = None
    per_token: Optional[float] = None
    settings: Optional[str] = None

    def render(self, graph: str, names: Sequence[str]) -> SiteRecord:
        """The public record, with ``names[k]`` the name of slot ``k`` in one model instance."""
        return SiteRecord(
            graph=graph,
            node=self.node,
            weight=names[self.slot],
            status=self.status,
            reason=self.reason.format(*(names[k] for k in self.related)),
            input_shape=self.input_shape,
            dtype=self.dtype,
            sub_token_size=self.sub_token_size,
            bytes_before=self.bytes_before,
            bytes_after=self.bytes_after,
            estimator=self.estimator,
            per_token=self.per_token,
            settings=self.settings,
        )
