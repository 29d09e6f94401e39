"""``GraphWriter``: how a codec writes its nodes into a joint graph.

A codec's graph code (``Estimator.emit_encode`` / ``emit_weight_grad`` /
``emit_decode`` in ``velora_fx/codec.py``) calls ``w(op, *args)`` for each aten
op: the node is inserted before the writer's reference node, sized with
``meta["val"]`` (the min-cut partitioner reads it), carries the reference
node's provenance (stack trace, module stack, activation-checkpointing tags)
and is tagged ``{"role": role}`` under ``META_KEY``. ``w.trace(fn, ...)``
inlines plain tensor code instead (traced to aten ops with Inductor's
decompositions), for codecs written once for both routes; ``w.shared(fn, ...,
key)`` traces it once per key and input signature into a subgraph that every
such call invokes, so that Inductor generates its code once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx.passes.sites import META_KEY

__all__ = ["GraphWriter", "val"]

aten = torch.ops.aten
prims = torch.ops.prims

_CARRIED_META = ("stack_trace", "nn_module_stack", "seq_nr", "partitioner_tag", "recompute", "ac_graph_id", "source_fn_stack")


def val(node: Any) -> Any:
    """The fake value of a node (``meta["val"]``), or the constant itself."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


class GraphWriter:
    """Inserts nodes before ``like`` in ``graph``, with ``meta["val"]``, ``like``'s provenance and ``role``."""

    def __init__(self, graph: torch.fx.Graph, like: torch.fx.Node, role: str):
        self.graph, self.like, self.role = graph, like, role

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        with self.graph.inserting_before(self.like):
            node = self.graph.call_function(target, args, kwargs)
        fake_args = torch.fx.node.map_arg(args, val)
        fake_kwargs = torch.fx.node.map_arg(kwargs, val)
        node.meta["val"] = target(*fake_args, **fake_kwargs)
        node.meta.update(self.carried())
        return node

    def carried(self) -> dict[str, Any]:
        """The provenance ``meta`` of the nodes this writer inserts, with its ``role``."""
        meta = {key: self.like.meta[key] for key in _CARRIED_META if key in self.like.meta}
        meta[META_KEY] = {"role": self.role}
        return meta

    def trace(self, fn: Callable[..., Any], args: Sequence[Any]) -> Any:
        """``fn(*args)`` (plain tensor code on the nodes' values) traced to aten ops and inserted here."""
        return ti.trace_into(self.graph, fn, list(args), self.like, self.carried())

    def shared(self, fn: Callable[..., Any], args: Sequence[Any], key: Any, backward: bool = False) -> Any:
        """``trace``, but traced once per ``key`` (what ``fn`` computes besides its inputs: equal keys, same code)
        and input signature into a subgraph of the graph, called here with ``invoke_subgraph``; ``backward``: the
        call belongs in backward although it reads only forward values (``ti.trace_shared``)."""
        return ti.trace_shared(self.graph, fn, list(args), self.like, self.carried(), key, backward)

    def dims(self, node: torch.fx.Node, upto: int) -> list[Any]:
        """Sizes ``node.shape[:upto]`` as graph values: ints, or ``sym_size`` nodes where symbolic."""
        out: list[Any] = []
        for i, s in enumerate(val(node).shape[:upto]):
            out.append(int(s) if not ti.is_symbolic(s) else self(aten.sym_size.int, node, i))
        return out

    def cast(self, node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
        return node if val(node).dtype == dtype else self(prims.convert_element_type.default, node, dtype)

    def scaled(self, node: torch.fx.Node, scale: float) -> torch.fx.Node:
        return node if scale == 1.0 else self(aten.mul.Tensor, node, scale)
