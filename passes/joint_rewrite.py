"""Applying a joint-graph plan: the codec's ``encode`` before the first forward site, every weight gradient formed
from what it keeps, so that the min-cut partitioner keeps that (or recomputes it) and drops ``X``.

The pass knows no basis: it finds where to write and in which form each
weight gradient reads ``X``; the codec (``velora_fx/codec.py``) writes its own
nodes through a ``GraphWriter``: ``emit_encode``, ``emit_weight_grad`` where
the weight gradient is a plain ``mm`` of ``X``'s rows, else ``emit_decode``'s
``x̂`` read by the original op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx.codec import Estimator as Codec
from velora_fx.passes.contract import GraphSpec, RewriteOptions
from velora_fx.passes.graph_writer import GraphWriter, val
from velora_fx.passes.joint_plan import JointPlan
from velora_fx.passes.sites import ATEN_ROW_VIEWS, ATEN_TRANSPOSES_2D, META_KEY

__all__ = ["apply_joint_plan"]

aten = torch.ops.aten
prims = torch.ops.prims


def _as_rows(x: torch.fx.Node, chain: list[torch.fx.Node]) -> Optional[bool]:
    """How a weight-gradient ``mm`` reads ``X`` through ``chain``: ``False`` as ``X.view(N, D)``,
    ``True`` as its transpose ``(D, N)``, ``None`` for anything else (then ``x̂`` is rebuilt)."""
    features = val(x).shape[-1]
    transposed = False
    for i, node in enumerate(chain):
        shape = val(node).shape
        if node.target in ATEN_ROW_VIEWS and not transposed and shape[-1] == features:
            continue  # row-major views that keep the last dim keep the row order
        if node.target in ATEN_TRANSPOSES_2D and i == len(chain) - 1 and len(shape) == 2 and shape[0] == features:
            transposed = True
            continue
        return None
    if len(val(chain[-1] if chain else x).shape) != 2:
        return None
    return transposed


def _weight_grad(graph, codec: Codec, consumer, reads, chain, x, saved, state, basis_shape, scale) -> Optional[torch.fx.Node]:
    """``dŴ`` of a weight-gradient ``mm`` formed by the codec from what it saved (``emit_weight_grad``), or ``None``
    if the op's form is not ``mm(G, X.view(N, D))`` / ``mm(X.view(N, D).t(), G)`` or the codec forms none."""
    if consumer.target is not aten.mm.default:
        return None
    transposed = _as_rows(x, chain)
    if transposed is None or consumer.args[1 if not transposed else 0] is not reads:
        return None
    w = GraphWriter(graph, consumer, "weight_gradient")
    rows, n_rows = val(reads).shape[1 if transposed else 0], val(saved[0]).shape[0]
    static = not ti.is_symbolic(rows) and not ti.is_symbolic(n_rows)
    spelled = None
    if rows is not n_rows and not (static and int(rows) == int(n_rows)):  # sizes spelled differently
        spelled = w.dims(reads, 2)[1 if transposed else 0]
    g = consumer.args[0] if not transposed else w(aten.permute.default, consumer.args[1], [1, 0])  # (out, N)
    dw = codec.emit_weight_grad(w, g, spelled, saved, state, basis_shape, int(val(x).shape[-1]), scale)  # (out, D)
    if dw is None:  # the codec forms no weight gradient itself: leave the graph as it was
        for node in (g, spelled):
            if isinstance(node, torch.fx.Node) and node not in consumer.args and not node.users:
                graph.erase_node(node)
        return None
    return dw if not transposed else w(aten.permute.default, dw, [1, 0])


def apply_joint_plan(graph: torch.fx.Graph, plan: JointPlan, spec: GraphSpec, options: RewriteOptions) -> bool:
    """Rewrite ``graph`` as ``plan`` says; returns whether anything changed."""
    changed = False
    codec = options.codec
    layout = ti.joint_layout(graph)
    inputs = {i: n for n, i in layout.input_index.items()}
    direction: dict[int, torch.fx.Node] = {}
    for marker in plan.markers:
        direction[int(marker.args[1])] = marker.args[0]
        marker.replace_all_uses_with(marker.args[0])
        graph.erase_node(marker)
        changed = True
    order = {n: i for i, n in enumerate(graph.nodes)}
    for x, group in plan.groups.items():
        first_site_of: dict[int, torch.fx.Node] = {}  # per basis input: the first site of every slot using it
        for k, (fw_sites, _) in group.items():
            first = min(fw_sites, key=order.__getitem__)
            b = spec.slots[k].basis_primal
            if b not in first_site_of or order[first] < order[first_site_of[b]]:
                first_site_of[b] = first
        kept: dict[torch.fx.Node, tuple[torch.fx.Node, ...]] = {}  # state -> what the codec keeps: shared with it
        readers: dict[torch.fx.Node, list] = {}  # state -> (consumer, chain, slot) of every weight gradient of it
        for k, (fw_sites, consumers) in group.items():
            slot = spec.slots[k]
            state = direction.get(slot.basis_primal) if slot.refreshed else inputs[slot.basis_primal]
            if state is None:
                raise ValueError(f"no direction marker for the state input {slot.basis_primal} of slot {k}")
            if state not in kept:
                first = first_site_of[slot.basis_primal]
                kept[state] = codec.emit_encode(GraphWriter(graph, first, "project"), x, state, slot.basis_shape)
            for site in fw_sites:
                site.meta[META_KEY] = {"site": k}
            readers.setdefault(state, []).extend((consumer, chain, k) for consumer, chain in consumers)
        for state, consumers in readers.items():
            saved = kept[state]
            # x̂, rebuilt only for weight gradients the codec does not form itself: once per state and size (the
            # weights of one input share it), before the first of them in the graph
            x_hat: dict[object, torch.fx.Node] = {}
            for consumer, chain, k in sorted(consumers, key=lambda c: order[c[0]]):
                slot = spec.slots[k]
                reads = chain[-1] if chain else x
                dw = _weight_grad(graph, codec, consumer, reads, chain, x, saved, state, slot.basis_shape, options.scale)
                if dw is not None:
                    dw.meta[META_KEY] = {"role": "weight_gradient", "weight_gradient": k}
                    consumer.replace_all_uses_with(dw)
                    graph.erase_node(consumer)
                else:
                    w = GraphWriter(graph, consumer, "reconstruct")
                    if slot.basis_shape not in x_hat:
                        x_hat[slot.basis_shape] = codec.emit_decode(w, x, saved, state, slot.basis_shape, options.scale)
                    y = x_hat[slot.basis_shape]
                    for view in chain:
                        y = w(view.target, y, *view.args[1:], **view.kwargs)
                    consumer.replace_input_with(reads, y)
                    consumer.meta[META_KEY] = {"weight_gradient": k}
                for dead in reversed(chain):
                    if not dead.users:
                        graph.erase_node(dead)
        changed = changed or bool(group)
    if changed:
        graph.lint()
    return changed
