"""Applying a joint-graph plan: ``p = X B`` (or a codec's ``encode``) before the first forward site, every weight
gradient served from it, so that the min-cut partitioner keeps ``p`` (or recomputes it) and drops ``X``.

See NOTE [VeLoRA weight gradient] in ``velora_fx/ops.py`` for the math; the
numbers here are those of ``ops.project`` / ``ops.weight_grad`` up to float
re-association.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx.codec import Estimator as Codec
from velora_fx.passes.contract import GraphSpec, RewriteOptions
from velora_fx.passes.joint_plan import JointPlan, val
from velora_fx.passes.sites import ATEN_ROW_VIEWS, ATEN_TRANSPOSES_2D, META_KEY

__all__ = ["apply_joint_plan"]

aten = torch.ops.aten
prims = torch.ops.prims


_CARRIED_META = ("stack_trace", "nn_module_stack", "seq_nr", "partitioner_tag", "recompute", "ac_graph_id", "source_fn_stack")


class _Builder:
    """Inserts nodes with ``meta["val"]`` (min-cut sizes nodes with it) and provenance carried from a reference node."""

    def __init__(self, graph: torch.fx.Graph, like: torch.fx.Node, role: str):
        self.graph, self.like, self.role = graph, like, role

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fake_args = torch.fx.node.map_arg(args, val)
        fake_kwargs = torch.fx.node.map_arg(kwargs, val)
        node.meta["val"] = target(*fake_args, **fake_kwargs)
        for key in _CARRIED_META:
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        node.meta[META_KEY] = {"role": self.role}
        return node


def _dims(build: _Builder, node: torch.fx.Node, upto: int) -> list[Any]:
    """Sizes ``node.shape[:upto]`` as graph values: ints, or ``sym_size`` nodes where symbolic."""
    out: list[Any] = []
    for i, s in enumerate(val(node).shape[:upto]):
        out.append(int(s) if not ti.is_symbolic(s) else build(aten.sym_size.int, node, i))
    return out


def _cast(b: _Builder, node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    return node if val(node).dtype == dtype else b(prims.convert_element_type.default, node, dtype)


def _scaled(b: _Builder, node: torch.fx.Node, scale: float) -> torch.fx.Node:
    return node if scale == 1.0 else b(aten.mul.Tensor, node, scale)


def _as_basis(b: _Builder, basis: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """The basis input as a ``(d, r)`` matrix in ``dtype`` (VeLoRA's ``(d,)`` direction is a column)."""
    basis = _cast(b, basis, dtype)
    return b(aten.view.default, basis, [-1, 1]) if val(basis).dim() == 1 else basis


# Every quantity below is one ``aten.mm`` with the basis ``B`` (d, r) or its
# transpose: an extern kernel, nothing for Inductor to generate (when ``d``
# divides ``D``: else the last sub-token is padded / cut, one small kernel).
# With ``X`` of shape ``(N, D)`` seen as ``N·n`` sub-tokens of ``d``:
#
#   p  = (X.view(N·n, d) @ B).view(N, n·r)
#   x̂  = (p.view(N·n, r) @ Bᵀ).view(N, n·d)[:, :D]
#   dŴ = ((G p).view(out·n, r) @ Bᵀ).view(out, n·d)[:, :D]        G p first: N × n·r, not N × D
#
# Measured on the LLaMA-style stack of benchmarks/backend_bench.py: with the
# projection and the dW assembly as pointwise code, compile time 1.30-1.34x the
# default backend's (~5 more generated kernels per graph); as matmuls, 1.00x.
# The one thing pointwise code bought: min-cut may recompute a pointwise
# projection in backward from what it keeps anyway (the norm's input), while it
# never recomputes an mm, so p is saved: 0.725x vs 0.740x bytes kept there.


def _sub_token_rows(b: _Builder, x: torch.fx.Node, d: int) -> torch.fx.Node:
    """``x`` of shape ``(..., D)`` as ``(N·n, d)`` sub-token rows (padded to ``n·d``; copied when its strides
    do not allow the view)."""
    features = int(val(x).shape[-1])
    n = -(-features // d)
    if n * d != features:
        x = b(aten.constant_pad_nd.default, x, [0, n * d - features], 0.0)
    try:
        val(x).view(-1, d)
    except (RuntimeError, ValueError):  # e.g. a strided slice (a [CLS] token): copy it (transient, forward only)
        x = b(aten.clone.default, x, memory_format=torch.contiguous_format)
    return b(aten.view.default, x, [-1, d])


def _spread(b: _Builder, q: torch.fx.Node, basis: torch.fx.Node, features: int) -> torch.fx.Node:
    """``q`` of shape ``(R, n·r)`` back in input coordinates: ``(R, D)``, block ``j`` is ``q[:, j·r:(j+1)·r] @ Bᵀ``."""
    d, r = (int(s) for s in val(basis).shape)
    n = int(val(q).shape[-1]) // r
    rows = b(aten.view.default, q, [-1, r])
    flat = b(aten.view.default, b(aten.mm.default, rows, b(aten.permute.default, basis, [1, 0])), [-1, n * d])
    return flat if n * d == features else b(aten.slice.Tensor, flat, 1, 0, features)


def _project(graph, x, basis, site) -> torch.fx.Node:
    """``p`` of shape ``(N, n·r)`` (rows of ``X``), inserted before ``site``."""
    with graph.inserting_before(site):
        b = _Builder(graph, site, "project")
        bb = _as_basis(_Builder(graph, site, "basis"), basis, val(x).dtype)
        d, r = (int(s) for s in val(bb).shape)
        n = -(-int(val(x).shape[-1]) // d)
        return b(aten.view.default, b(aten.mm.default, _sub_token_rows(b, x, d), bb), [-1, n * r])


def _reconstruct(graph, x, p, basis, scale, before) -> torch.fx.Node:
    """``x̂ = scale · p Bᵀ`` blockwise, in the shape of ``x``, inserted before ``before``."""
    features = int(val(x).shape[-1])
    with graph.inserting_before(before):
        b = _Builder(graph, before, "reconstruct")
        x_hat = _spread(b, _scaled(b, p, scale), _as_basis(b, basis, val(p).dtype), features)
        return b(aten.view.default, x_hat, [*_dims(b, x, val(x).dim() - 1), features])


def _carried(like: torch.fx.Node, role: str) -> dict[str, Any]:
    """The provenance ``meta`` of nodes inserted for ``like``, tagged with their ``role``."""
    meta = {key: like.meta[key] for key in _CARRIED_META if key in like.meta}
    meta[META_KEY] = {"role": role}
    return meta


def _encode(graph, codec: Codec, x, state, basis_shape, site) -> tuple[torch.fx.Node, ...]:
    """What a traced codec keeps of ``X`` (``codec.encode``, traced to aten ops), inserted before ``site``."""
    saved = ti.trace_into(graph, lambda x, s: codec.encode(x, s, basis_shape), [x, state], site,
                          _carried(site, "project"))  # fmt: skip
    return tuple(saved)


def _decode(graph, codec: Codec, x, saved, state, basis_shape, scale, before) -> torch.fx.Node:
    """``x̂ = scale · decode(saved)`` of a traced codec, in the shape and dtype of ``x``, inserted before ``before``."""
    features, dtype = int(val(x).shape[-1]), val(x).dtype
    rows = ti.trace_into(graph, lambda s, *saved: codec.decode(saved, s, basis_shape, features, dtype),
                         [state, *saved], before, _carried(before, "reconstruct"))  # fmt: skip
    with graph.inserting_before(before):
        b = _Builder(graph, before, "reconstruct")
        return b(aten.view.default, _scaled(b, rows, scale), [*_dims(b, x, val(x).dim() - 1), features])


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


def _weight_grad_from_p(graph, consumer, reads, chain, x, p, basis, scale) -> Optional[torch.fx.Node]:
    """``dŴ`` of a weight-gradient ``mm`` computed from ``p`` without rebuilding ``x̂``, or ``None`` if its form is not
    one of ``mm(G, X.view(N, D))`` / ``mm(X.view(N, D).t(), G)``."""
    if consumer.target is not aten.mm.default:
        return None
    transposed = _as_rows(x, chain)
    if transposed is None or consumer.args[1 if not transposed else 0] is not reads:
        return None
    features = int(val(x).shape[-1])
    with graph.inserting_before(consumer):
        b = _Builder(graph, consumer, "weight_gradient")
        bb = _as_basis(b, basis, val(p).dtype)
        rows = val(reads).shape[1 if transposed else 0]
        n_rows = val(p).shape[0]
        static = not ti.is_symbolic(rows) and not ti.is_symbolic(n_rows)
        p2d = p
        if rows is not n_rows and not (static and int(rows) == int(n_rows)):  # sizes spelled differently
            p2d = b(aten.view.default, p, [_dims(b, reads, 2)[1 if transposed else 0], val(p).shape[1]])
        g = consumer.args[0] if not transposed else b(aten.permute.default, consumer.args[1], [1, 0])  # (out, N)
        dw = _spread(b, _scaled(b, b(aten.mm.default, g, p2d), scale), bb, features)  # (out, D)
        return dw if not transposed else b(aten.permute.default, dw, [1, 0])


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
        projections: dict[torch.fx.Node, torch.fx.Node] = {}  # basis -> p: weights sharing a basis share p
        for k, (fw_sites, consumers) in group.items():
            slot = spec.slots[k]
            basis = direction.get(slot.basis_primal) if slot.refreshed else inputs[slot.basis_primal]
            if basis is None:
                raise ValueError(f"no direction marker for the basis input {slot.basis_primal} of slot {k}")
            if basis not in projections:
                first = first_site_of[slot.basis_primal]
                projections[basis] = (_encode(graph, codec, x, basis, slot.basis_shape, first) if codec.traced
                                      else _project(graph, x, basis, first))  # fmt: skip
            p = projections[basis]
            for site in fw_sites:
                site.meta[META_KEY] = {"site": k}
            x_hat = None  # rebuilt only for weight gradients that cannot be served from p directly
            for consumer, chain in sorted(consumers, key=lambda c: order[c[0]]):
                reads = chain[-1] if chain else x
                dw = None if codec.traced else _weight_grad_from_p(graph, consumer, reads, chain, x, p, basis,
                                                                   options.scale)  # fmt: skip
                if dw is not None:
                    dw.meta[META_KEY] = {"role": "weight_gradient", "weight_gradient": k}
                    consumer.replace_all_uses_with(dw)
                    graph.erase_node(consumer)
                else:
                    if x_hat is None and codec.traced:
                        x_hat = _decode(graph, codec, x, p, basis, slot.basis_shape, options.scale, consumer)
                    elif x_hat is None:
                        x_hat = _reconstruct(graph, x, p, basis, options.scale, consumer)
                    y = x_hat
                    with graph.inserting_before(consumer):
                        b = _Builder(graph, consumer, "reconstruct")
                        for view in chain:
                            y = b(view.target, y, *view.args[1:], **view.kwargs)
                    consumer.replace_input_with(reads, y)
                    consumer.meta[META_KEY] = {"weight_gradient": k}
                for dead in reversed(chain):
                    if not dead.users:
                        graph.erase_node(dead)
            changed = True
    if changed:
        graph.lint()
    return changed
