"""What the min-cut partitioner chose for one graph: the tensors the forward saves for backward, how many of them
are projections, and what backward recomputes instead of saving.

Two read-only passes, installed for the backend's compiles only:

* ``JointOutline`` (``joint_custom_post_pass``, after every joint pass, right before partitioning) keeps an
  outline of the joint graph: each node's name, op and inputs, and whether it depends on a tangent (backward) or
  not (the forward's, or recomputable).
* ``ForwardSummary`` (``post_grad_custom_post_pass``) sees the partitioned forward graph, whose outputs AOTAutograd
  describes (``SavedForBackwardsAOTOutput``: a tensor saved for backward). From the saved set and the outline it
  derives the forward ops backward recomputes: the forward nodes backward reads, and what they need, down to
  saved tensors and inputs.

Neither changes a graph; both have a ``uuid`` so the compile caches stay on (on a cache hit the summary is read
back with the plan, ``plan_store``). Sizes use the example inputs' sizes where shapes are symbolic.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx.passes.sites import META_KEY
from velora_fx.records import GraphSummary

__all__ = ["JointOutline", "ForwardSummary", "sources_uuid"]

_SOURCES = (__file__, ti.__file__)  # this module and the torch internals it reads the graphs with


def sources_uuid() -> str:
    """What both passes' results depend on: a part of the plan store's key (the summary is stored with the plan)."""
    return ti.hash_files(_SOURCES)


@dataclasses.dataclass
class _Node:
    op: str
    inputs: tuple[str, ...]
    forward: bool


class JointOutline(ti.CustomGraphPass):
    """Records the joint graph's outline (see the module docstring); changes nothing."""

    def __init__(self):
        self.nodes: Optional[dict[str, _Node]] = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        # backward = what depends on a tangent; everything else may run in the forward (or be recomputed)
        backward: set[str] = set()
        for node in graph.nodes:
            if node.op == "placeholder":
                if ti.is_tangent(node):
                    backward.add(node.name)
            elif any(i.name in backward for i in node.all_input_nodes):
                backward.add(node.name)
        self.nodes = {
            n.name: _Node(_op_name(n), tuple(i.name for i in n.all_input_nodes), n.name not in backward)
            for n in graph.nodes
            if n.op in ("call_function", "placeholder")
        }

    def uuid(self) -> str:
        return ti.hash_files(_SOURCES, "outline")


class ForwardSummary(ti.CustomGraphPass):
    """Summarises the partitioned forward graph against ``outline``; changes nothing."""

    def __init__(self, graph_name: str, outline: JointOutline, parameter_inputs: set[int], budget: Optional[float]):
        self.graph_name, self.outline, self.parameter_inputs, self.budget = graph_name, outline, parameter_inputs, budget
        self.summary: Optional[GraphSummary] = None
        self.ran = False  # False after a compile whose forward came from Inductor's FX graph cache

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.ran = True
        saved = ti.saved_for_backward(graph)
        if saved is None or self.summary is not None:  # not a forward graph (the backward, compiled later)
            return
        parameters = {n.name for n, i in ti.input_positions(graph).items() if i in self.parameter_inputs}
        kept = [n for n in saved if isinstance(n.meta.get("val"), torch.Tensor) and n.name not in parameters]
        nbytes = [_bytes(n) for n in kept]
        projections = [b for n, b in zip(kept, nbytes) if n.meta.get(META_KEY, {}).get("role") == "project"]
        self.summary = GraphSummary(
            graph=self.graph_name,
            saved_bytes=sum(nbytes),
            saved_tensors=len(kept),
            projection_bytes=sum(projections),
            projections=len(projections),
            recomputed=_recomputed(self.outline.nodes or {}, {n.name for n in saved}),
            memory_budget=self.budget,
        )

    def uuid(self) -> str:
        return ti.hash_files(_SOURCES, "forward")


def _op_name(node: torch.fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _bytes(node: torch.fx.Node) -> int:
    val = node.meta["val"]
    numel = 1
    for s in val.shape:
        numel *= ti.size_hint(s)
    return numel * val.element_size()


def _recomputed(nodes: dict[str, _Node], saved: set[str]) -> tuple[tuple[str, int], ...]:
    """Forward ops that backward needs and that are not saved: what the partitioner recomputes, by op, counted."""
    needed = [i for node in nodes.values() if not node.forward and node.op != "placeholder"
              for i in node.inputs if i in nodes and nodes[i].forward]  # fmt: skip
    seen: set[str] = set()
    while needed:
        name = needed.pop()
        if name in seen or name in saved or nodes[name].op == "placeholder":
            continue
        seen.add(name)
        needed.extend(i for i in nodes[name].inputs if i in nodes)
    counts = collections.Counter(nodes[n].op for n in seen if nodes[n].op not in _FREE)
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


#: Ops that only describe a tensor differently (no arithmetic): recomputing them is free, so they are not counted.
_FREE = frozenset({"view", "_unsafe_view", "reshape", "permute", "t", "transpose", "expand", "alias", "squeeze",
                   "unsqueeze", "slice", "select", "as_strided", "getitem", "sym_size", "detach"})  # fmt: skip
