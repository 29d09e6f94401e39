"""The VeLoRA rewrite of a joint forward+backward aten graph, before the partitioner.

Plan, then apply (the invariants are in README.md beside this file):

* ``plan_joint_graph`` finds every *site* (an aten matmul in the forward
  whose weight operand traces back, through the weight chain of
  ``passes/sites.py``, to a trainable parameter input) and decides **per
  stored tensor** ``X`` (the left operand with its views peeled off) whether
  it can be compressed: only when every backward use of ``X`` is a
  weight-gradient matmul of a site that has a projection basis. The plan is
  data: one ``PlannedSite`` per site, with status, reason and bytes.
* ``apply_joint_plan`` inserts ``p = X B`` before the first forward site and
  serves every weight gradient from ``p``, so that the min-cut partitioner
  keeps ``p`` (or recomputes it) and drops ``X``.
* ``velora_joint_pass`` runs both, guarded: a failure leaves the graph as it
  was (exact) and is logged; it returns ``PassResult(graph, modified)``.

See NOTE [VeLoRA weight gradient] in ``velora_fx/ops.py`` for the math; the
numbers here are those of ``ops.project`` / ``ops.weight_grad`` up to float
re-association.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from velora_fx import _torch_internals as ti
from velora_fx.codec import Estimator
from velora_fx.config import VeloraConfig
from velora_fx.estimators import for_config
from velora_fx.passes import contract, sites
from velora_fx.passes.contract import GraphSpec, ParamSlot, PlannedSite, escape
from velora_fx.passes.sites import (
    ATEN_INPUT_CHAIN,
    ATEN_MATMULS,
    ATEN_ROW_VIEWS,
    ATEN_TRANSPOSES_2D,
    ATEN_VIEWS,
    ATEN_WEIGHT_CHAIN,
    META_KEY,
)
from velora_fx.report import COMPRESSED, SKIPPED, kept_bytes

__all__ = ["JointPlan", "VeloraJointPass", "plan_joint_graph", "apply_joint_plan", "velora_joint_pass", "DIRECTION_OP"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
prims = torch.ops.prims


# -- the marker op of a per-step direction ----------------------------------------
#
# Under init="batch_average" / "ema" the backend computes ``v_t`` for this step
# inside the Dynamo graph (passes/dynamo_graph.py) and wraps it in this op (also
# returned as an extra output, so the runtime can write it into the state). The
# pass finds the op by its ``slot`` argument (the position of the basis input it
# replaces, shared by every weight using that basis), uses its input as the
# basis of those weights' sites, and removes it. Should the pass not run or
# fail, Inductor falls back to the eager kernel: a copy, still correct.


@torch.library.custom_op("velora_fx::direction", mutates_args=())
def _direction(v: torch.Tensor, slot: int) -> torch.Tensor:
    """Marks ``v`` as this step's value of the basis input at position ``slot`` (a copy)."""
    return v.clone()


@_direction.register_fake
def _(v: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(v)


DIRECTION_OP = torch.ops.velora_fx.direction.default


# -- the plan ---------------------------------------------------------------------


@dataclass
class _Site:
    node: torch.fx.Node
    slot: int
    x: Optional[torch.fx.Node] = None
    left: Optional[torch.fx.Node] = None
    features: Optional[int] = None
    reason: str = ""
    related: tuple[int, ...] = ()


@dataclass
class JointPlan:
    """The plan of one joint graph: every site with its decision, and what to rewrite.

    ``groups`` maps a compressed stored tensor to, per weight slot, the forward
    sites and the weight-gradient consumers ``(consumer, view chain from X)``.
    """

    sites: list[PlannedSite] = field(default_factory=list)
    groups: dict[torch.fx.Node, dict[int, tuple[list[torch.fx.Node], list[tuple[torch.fx.Node, list[torch.fx.Node]]]]]] = field(default_factory=dict)  # fmt: skip
    markers: list[torch.fx.Node] = field(default_factory=list)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _shape_hint(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(ti.size_hint(s) for s in _val(node).shape)


def _static_dim(value: Any) -> Optional[int]:
    return None if ti.is_symbolic(value) else int(value)


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if node.op == "call_function" else node.op


def _trace_back(node: Any, chain_ops: frozenset) -> tuple[Any, list[torch.fx.Node]]:
    """Follow ``node``'s first argument through ``chain_ops``; the source and the chain (source first)."""
    chain: list[torch.fx.Node] = []
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in chain_ops:
        if node.target is aten.expand.default and list(_val(node).shape) != list(_val(node.args[0]).shape):
            break
        chain.append(node)
        node = node.args[0]
    chain.reverse()
    return node, chain


def _forward_nodes(graph: torch.fx.Graph, fw_outputs: Sequence[Any]) -> set[torch.fx.Node]:
    """Nodes the forward outputs depend on (what the partitioner must put in the forward)."""
    seen: set[torch.fx.Node] = set()
    stack = [o for o in fw_outputs if isinstance(o, torch.fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _reached_outputs(node: torch.fx.Node, output: torch.fx.Node) -> set[int]:
    """Positions of the graph outputs that ``node``'s value flows into."""
    positions: set[int] = set()
    seen: set[torch.fx.Node] = set()
    stack = [node]
    outs = output.args[0]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u is output:
                positions.update(i for i, o in enumerate(outs) if o is n)
            else:
                stack.append(u)
    return positions


def _backward_uses(x: torch.fx.Node, forward: set[torch.fx.Node]) -> list[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """Every backward node reading ``x`` (through pure views), with the view chain from ``x``."""
    uses: list[tuple[torch.fx.Node, list[torch.fx.Node]]] = []

    def walk(n: torch.fx.Node, chain: list[torch.fx.Node]) -> None:
        for u in n.users:
            if u.op == "output":
                continue
            if u.op == "call_function" and u.target in ATEN_VIEWS and u.args[0] is n:
                walk(u, chain + [u])
            elif u not in forward:
                uses.append((u, chain))

    walk(x, [])
    return uses


class _Graph:
    """What planning needs to know about one joint graph, computed once."""

    def __init__(self, graph: torch.fx.Graph, spec: GraphSpec):
        self.layout = ti.joint_layout(graph)
        self.output = graph.output_node()
        self.forward = _forward_nodes(graph, self.layout.forward_outputs)
        self.slot_of_input = {s.primal: k for k, s in enumerate(spec.slots)}
        self.spec = spec

    def trainable_slot(self, node: Any) -> Optional[int]:
        """The slot of a parameter input ``node`` whose gradient the graph computes, else ``None``."""
        index = self.layout.input_index.get(node)
        k = self.slot_of_input.get(index) if index is not None else None
        return k if k is not None and self.layout.grad_of_input.get(index) is not None else None

    def grads_reached(self, node: torch.fx.Node) -> tuple[set[int], bool]:
        """The inputs whose gradients ``node`` flows into, and whether it reaches any other output too."""
        reached = _reached_outputs(node, self.output)
        inputs = {self.layout.input_of_grad_output[i] for i in reached if i in self.layout.input_of_grad_output}
        return inputs, len(inputs) != len(reached) or any(i not in self.layout.input_of_grad_output for i in reached)

    def kept_anyway(self, x: torch.fx.Node) -> str:
        """Why backward keeps ``x`` whatever is done to the weight gradients ("" if only weight gradients read it)."""
        for consumer, _ in _backward_uses(x, self.forward):
            inputs, other = self.grads_reached(consumer)
            is_matmul = consumer.op == "call_function" and consumer.target in (aten.mm.default, aten.bmm.default)
            if not is_matmul or len(inputs) != 1 or other:
                return f"the input is kept for backward anyway: {escape(_op_name(consumer))} reads it"
        return ""


def plan_joint_graph(graph: torch.fx.Graph, spec: GraphSpec, config: VeloraConfig) -> JointPlan:
    """Decide, for every site of a joint graph, whether its stored input is compressed, and why.

    Args:
        graph: the joint forward+backward graph (AOTAutograd's, post-decomposition, with its input and
            output descriptors).
        spec: the graph's inputs as the backend built them.
        config: what to compress (``min_saved_bytes``; which weights is already in ``spec``).

    Returns:
        A ``JointPlan``; nothing in ``graph`` is changed.
    """
    markers = list(graph.find_nodes(op="call_function", target=DIRECTION_OP))
    g = _Graph(graph, spec)
    if len(g.layout.input_index) != spec.num_inputs:
        raise ValueError(f"{spec.name} has {len(g.layout.input_index)} inputs; the backend built {spec.num_inputs}")

    # 1. sites, each with its own verdict
    sites: list[_Site] = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ATEN_MATMULS or node not in g.forward:
            continue
        if "site" in node.meta.get(META_KEY, {}):
            continue  # rewritten by an earlier run: idempotent
        li, wi = ATEN_MATMULS[node.target]
        left, right = node.args[li], node.args[wi]
        k = g.trainable_slot(_trace_back(right, ATEN_WEIGHT_CHAIN)[0])
        if k is None:
            other = g.trainable_slot(_trace_back(left, ATEN_WEIGHT_CHAIN)[0])
            if other is not None:
                sites.append(_Site(node, other, reason=f"the weight is the left operand of {_op_name(node)}"))
            continue
        slot = spec.slots[k]
        x, _ = _trace_back(left, ATEN_INPUT_CHAIN)
        site = _Site(node, k, x, left, _static_dim(_val(left).shape[-1]))
        site.reason = _why_not(site, slot, g)
        sites.append(site)

    # 2. per stored tensor: compress only when every backward use is a weight gradient served from p
    by_x: dict[torch.fx.Node, list[_Site]] = {}
    for site in sites:
        if site.x is not None:
            by_x.setdefault(site.x, []).append(site)
    groups: dict = {}
    for x, xs in by_x.items():
        consumers, reason, related = _decide(x, xs, spec, config, g)
        for site in xs:
            if not site.reason:
                site.reason, site.related = reason, related
        if consumers is not None:
            group: dict[int, tuple[list[torch.fx.Node], list]] = {}
            for site in xs:
                group.setdefault(site.slot, ([], []))[0].append(site.node)
            for consumer, chain, k in consumers:
                group[k][1].append((consumer, chain))
            groups[x] = group
    return JointPlan(_records(sites, by_x, groups, spec, for_config(config)), groups, markers)


def _why_not(site: _Site, slot: ParamSlot, g: _Graph) -> str:
    """Why one site cannot be compressed on its own ("" if it can, as far as the site alone tells)."""
    left, x, features = site.left, site.x, site.features
    if slot.basis_primal is None:
        return escape(slot.reason or "the weight has no projection basis")
    if features is None:
        return "the contraction size is symbolic"
    if not _val(left).dtype.is_floating_point:
        return f"the input is {_val(left).dtype}: only real floating-point inputs are compressed"
    if slot.features != features:
        return f"the basis is sized for D={slot.features}, this matmul contracts D={features}"
    if _static_dim(_val(x).shape[-1]) != features:
        storage, _ = _trace_back(left, ATEN_VIEWS)
        return g.kept_anyway(storage) or (
            f"the contraction (D={features}) is not over the last dim of the stored input "
            f"{x.name} {tuple(_shape_hint(x))}"
        )
    if _val(x).dim() > 0 and _val(x).shape[-1] != 1 and _static_dim(_val(x).stride()[-1]) != 1:
        return f"the stored input {x.name} is not contiguous in its last dim"
    return ""


def _decide(x, xs: list[_Site], spec: GraphSpec, config: VeloraConfig, g: _Graph):
    """Whether the stored tensor ``x`` of sites ``xs`` can be served from ``p`` in backward:
    ``(consumers or None, reason, related slots)``."""
    slot_of_input = {spec.slots[s.slot].primal: s.slot for s in xs}
    consumers = []
    for consumer, chain in _backward_uses(x, g.forward):
        inputs, other = g.grads_reached(consumer)
        is_matmul = consumer.op == "call_function" and consumer.target in (aten.mm.default, aten.bmm.default)
        reads = chain[-1] if chain else x
        if not is_matmul or len(inputs) != 1 or other:
            reason = g.kept_anyway(x)
            return None, reason or f"the input is read in backward by {escape(_op_name(consumer))} ({consumer.name})", ()
        (index,) = inputs
        if index not in slot_of_input:
            return None, f"the input also feeds the gradient of input {index} ({consumer.name})", ()
        if sum(1 for a in consumer.args if a is reads) != 1:
            return None, f"{consumer.name} reads the input twice", ()
        consumers.append((consumer, chain, slot_of_input[index]))
    if not consumers:
        return None, "the input is not kept for any weight gradient", ()
    ineligible = [s for s in xs if s.reason]
    if ineligible:
        s = ineligible[0]
        return None, "the input is shared with {0}, which stays exact (" + s.reason + ")", (s.slot,)
    nbytes = kept_bytes(_shape_hint(x), _val(x).dtype, None)[0]
    if nbytes < config.min_saved_bytes:
        return None, f"the input keeps {nbytes} bytes < min_saved_bytes={config.min_saved_bytes}", ()
    return consumers, "", ()


def _records(sites: list[_Site], by_x, groups, spec: GraphSpec, codec: Estimator) -> list[PlannedSite]:
    """One ``PlannedSite`` per site: a stored tensor's bytes are counted once, on its first site; each ``p`` once."""
    planned: list[PlannedSite] = []
    counted: set[torch.fx.Node] = set()
    projected: set[tuple[torch.fx.Node, Optional[int]]] = set()  # one p per (X, basis)
    for site in sites:
        x, slot = site.x, spec.slots[site.slot]
        if x is None:
            planned.append(PlannedSite(site.slot, site.node.name, SKIPPED, site.reason, site.related))
            continue
        compressed = x in groups
        shape, dtype = _shape_hint(x), _val(x).dtype
        before, after = kept_bytes(shape, dtype, None)
        if compressed:
            after = codec.kept_bytes(shape, dtype, slot.basis_shape)
        key = (x, slot.basis_primal)
        if x in counted:
            before, after = 0, (after if compressed and key not in projected else 0)
        counted.add(x)
        reason, related = site.reason, site.related
        if compressed:
            projected.add(key)
            reason, related = "compressed", ()
            group = sorted({s.slot for s in by_x[x]})
            if len(group) > 1:  # one text for the whole group: the report prints it once
                one_p = len({spec.slots[k].basis_primal for k in group}) == 1
                names = ", ".join(f"{{{i}}}" for i in range(len(group)))
                reason = (f"compressed; {names} read one input and keep one p" if one_p else
                          f"compressed; {names} read one input (a p each)") + " (its bytes counted on the first)"
                related = tuple(group)
        per_token = codec.per_token(shape[-1], slot.basis_shape) if compressed else None
        sub_token = None if not compressed or codec.traced else slot.sub_token_size
        planned.append(PlannedSite(
            site.slot, site.node.name, COMPRESSED if compressed else SKIPPED, reason, related, shape,
            str(dtype).replace("torch.", ""), sub_token, before, after, codec.name if compressed else None, per_token,
        ))  # fmt: skip
    return planned


# -- apply -------------------------------------------------------------------------

_CARRIED_META = ("stack_trace", "nn_module_stack", "seq_nr", "partitioner_tag", "recompute", "ac_graph_id", "source_fn_stack")


class _Builder:
    """Inserts nodes with ``meta["val"]`` (min-cut sizes nodes with it) and provenance carried from a reference node."""

    def __init__(self, graph: torch.fx.Graph, like: torch.fx.Node, role: str):
        self.graph, self.like, self.role = graph, like, role

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fake_args = torch.fx.node.map_arg(args, _val)
        fake_kwargs = torch.fx.node.map_arg(kwargs, _val)
        node.meta["val"] = target(*fake_args, **fake_kwargs)
        for key in _CARRIED_META:
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        node.meta[META_KEY] = {"role": self.role}
        return node


def _dims(build: _Builder, node: torch.fx.Node, upto: int) -> list[Any]:
    """Sizes ``node.shape[:upto]`` as graph values: ints, or ``sym_size`` nodes where symbolic."""
    out: list[Any] = []
    for i, s in enumerate(_val(node).shape[:upto]):
        out.append(int(s) if not ti.is_symbolic(s) else build(aten.sym_size.int, node, i))
    return out


def _cast(b: _Builder, node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    return node if _val(node).dtype == dtype else b(prims.convert_element_type.default, node, dtype)


def _scaled(b: _Builder, node: torch.fx.Node, scale: float) -> torch.fx.Node:
    return node if scale == 1.0 else b(aten.mul.Tensor, node, scale)


def _as_basis(b: _Builder, basis: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """The basis input as a ``(d, r)`` matrix in ``dtype`` (VeLoRA's ``(d,)`` direction is a column)."""
    basis = _cast(b, basis, dtype)
    return b(aten.view.default, basis, [-1, 1]) if _val(basis).dim() == 1 else basis


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
    features = int(_val(x).shape[-1])
    n = -(-features // d)
    if n * d != features:
        x = b(aten.constant_pad_nd.default, x, [0, n * d - features], 0.0)
    try:
        _val(x).view(-1, d)
    except (RuntimeError, ValueError):  # e.g. a strided slice (a [CLS] token): copy it (transient, forward only)
        x = b(aten.clone.default, x, memory_format=torch.contiguous_format)
    return b(aten.view.default, x, [-1, d])


def _spread(b: _Builder, q: torch.fx.Node, basis: torch.fx.Node, features: int) -> torch.fx.Node:
    """``q`` of shape ``(R, n·r)`` back in input coordinates: ``(R, D)``, block ``j`` is ``q[:, j·r:(j+1)·r] @ Bᵀ``."""
    d, r = (int(s) for s in _val(basis).shape)
    n = int(_val(q).shape[-1]) // r
    rows = b(aten.view.default, q, [-1, r])
    flat = b(aten.view.default, b(aten.mm.default, rows, b(aten.permute.default, basis, [1, 0])), [-1, n * d])
    return flat if n * d == features else b(aten.slice.Tensor, flat, 1, 0, features)


def _project(graph, x, basis, site) -> torch.fx.Node:
    """``p`` of shape ``(N, n·r)`` (rows of ``X``), inserted before ``site``."""
    with graph.inserting_before(site):
        b = _Builder(graph, site, "project")
        bb = _as_basis(_Builder(graph, site, "basis"), basis, _val(x).dtype)
        d, r = (int(s) for s in _val(bb).shape)
        n = -(-int(_val(x).shape[-1]) // d)
        return b(aten.view.default, b(aten.mm.default, _sub_token_rows(b, x, d), bb), [-1, n * r])


def _reconstruct(graph, x, p, basis, scale, before) -> torch.fx.Node:
    """``x̂ = scale · p Bᵀ`` blockwise, in the shape of ``x``, inserted before ``before``."""
    features = int(_val(x).shape[-1])
    with graph.inserting_before(before):
        b = _Builder(graph, before, "reconstruct")
        x_hat = _spread(b, _scaled(b, p, scale), _as_basis(b, basis, _val(p).dtype), features)
        return b(aten.view.default, x_hat, [*_dims(b, x, _val(x).dim() - 1), features])


def _carried(like: torch.fx.Node, role: str) -> dict[str, Any]:
    """The provenance ``meta`` of nodes inserted for ``like``, tagged with their ``role``."""
    meta = {key: like.meta[key] for key in _CARRIED_META if key in like.meta}
    meta[META_KEY] = {"role": role}
    return meta


def _encode(graph, codec: Estimator, x, state, basis_shape, site) -> tuple[torch.fx.Node, ...]:
    """What a traced codec keeps of ``X`` (``codec.encode``, traced to aten ops), inserted before ``site``."""
    saved = ti.trace_into(graph, lambda x, s: codec.encode(x, s, basis_shape), [x, state], site,
                          _carried(site, "project"))  # fmt: skip
    return tuple(saved)


def _decode(graph, codec: Estimator, x, saved, state, basis_shape, scale, before) -> torch.fx.Node:
    """``x̂ = scale · decode(saved)`` of a traced codec, in the shape and dtype of ``x``, inserted before ``before``."""
    features, dtype = int(_val(x).shape[-1]), _val(x).dtype
    rows = ti.trace_into(graph, lambda s, *saved: codec.decode(saved, s, basis_shape, features, dtype),
                         [state, *saved], before, _carried(before, "reconstruct"))  # fmt: skip
    with graph.inserting_before(before):
        b = _Builder(graph, before, "reconstruct")
        return b(aten.view.default, _scaled(b, rows, scale), [*_dims(b, x, _val(x).dim() - 1), features])


def _as_rows(x: torch.fx.Node, chain: list[torch.fx.Node]) -> Optional[bool]:
    """How a weight-gradient ``mm`` reads ``X`` through ``chain``: ``False`` as ``X.view(N, D)``,
    ``True`` as its transpose ``(D, N)``, ``None`` for anything else (then ``x̂`` is rebuilt)."""
    features = _val(x).shape[-1]
    transposed = False
    for i, node in enumerate(chain):
        shape = _val(node).shape
        if node.target in ATEN_ROW_VIEWS and not transposed and shape[-1] == features:
            continue  # row-major views that keep the last dim keep the row order
        if node.target in ATEN_TRANSPOSES_2D and i == len(chain) - 1 and len(shape) == 2 and shape[0] == features:
            transposed = True
            continue
        return None
    if len(_val(chain[-1] if chain else x).shape) != 2:
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
    features = int(_val(x).shape[-1])
    with graph.inserting_before(consumer):
        b = _Builder(graph, consumer, "weight_gradient")
        bb = _as_basis(b, basis, _val(p).dtype)
        rows = _val(reads).shape[1 if transposed else 0]
        n_rows = _val(p).shape[0]
        static = not ti.is_symbolic(rows) and not ti.is_symbolic(n_rows)
        p2d = p
        if rows is not n_rows and not (static and int(rows) == int(n_rows)):  # sizes spelled differently
            p2d = b(aten.view.default, p, [_dims(b, reads, 2)[1 if transposed else 0], _val(p).shape[1]])
        g = consumer.args[0] if not transposed else b(aten.permute.default, consumer.args[1], [1, 0])  # (out, N)
        dw = _spread(b, _scaled(b, b(aten.mm.default, g, p2d), scale), bb, features)  # (out, D)
        return dw if not transposed else b(aten.permute.default, dw, [1, 0])


def apply_joint_plan(graph: torch.fx.Graph, plan: JointPlan, spec: GraphSpec, config: VeloraConfig) -> bool:
    """Rewrite ``graph`` as ``plan`` says; returns whether anything changed."""
    changed = False
    codec = for_config(config)
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
                                                                   config.scale)  # fmt: skip
                if dw is not None:
                    dw.meta[META_KEY] = {"role": "weight_gradient", "weight_gradient": k}
                    consumer.replace_all_uses_with(dw)
                    graph.erase_node(consumer)
                else:
                    if x_hat is None and codec.traced:
                        x_hat = _decode(graph, codec, x, p, basis, slot.basis_shape, config.scale, consumer)
                    elif x_hat is None:
                        x_hat = _reconstruct(graph, x, p, basis, config.scale, consumer)
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


# -- the pass ----------------------------------------------------------------------


def velora_joint_pass(graph: torch.fx.Graph, spec: GraphSpec, config: VeloraConfig) -> tuple[PassResult, JointPlan]:
    """Plan and apply the rewrite; a second run changes nothing. Guarded: on any error the graph is left as it
    was (exact: the direction markers, if any, are copies) and the error is logged.

    Returns ``PassResult(graph, modified)`` and the plan (empty after an error).
    """
    try:
        plan = plan_joint_graph(graph, spec, config)
    except Exception:  # planning changes nothing
        log.warning("velora_fx: planning %s failed; it stays exact", spec.name, exc_info=True)
        return PassResult(graph, False), JointPlan()
    snapshot = ti.snapshot_graph(graph)
    try:
        modified = apply_joint_plan(graph, plan, spec, config)
    except Exception:
        ti.restore_graph(graph, snapshot)
        log.warning("velora_fx: rewriting %s failed; it stays exact", spec.name, exc_info=True)
        return PassResult(graph, False), JointPlan()
    return PassResult(graph, modified), plan


#: what the rewrite and its plan depend on (with the config and the slots: see uuid): this module, the contract,
#: the site tables, the torch internals it goes through, the byte accounting of the report, and the estimators
#: (a traced codec's code is inlined into the graph: editing it must miss the cache)
_SOURCES = tuple(sys.modules[m].__file__ for m in (__name__, contract.__name__, sites.__name__, ti.__name__,
                                                   kept_bytes.__module__, "velora_fx.codec", "velora_fx.estimators",
                                                   "velora_fx.quantized", "velora_fx.ops"))


class VeloraJointPass(ti.CustomGraphPass):
    """``torch._inductor.config.joint_custom_pre_pass`` for one graph: ``velora_joint_pass``, plan kept in ``plan``.

    ``uuid()`` covers this file's source, the config and the graph's slots, so
    an Inductor / AOTAutograd cache hit never serves a graph rewritten
    differently (or not at all).
    """

    def __init__(self, spec: GraphSpec, config: VeloraConfig):
        self.spec, self.config = spec, config
        self.plan: Optional[JointPlan] = None
        self.modified = False

    def __call__(self, graph: torch.fx.Graph) -> None:
        result, self.plan = velora_joint_pass(graph, self.spec, self.config)
        self.modified = result.modified
        log.debug("velora_fx: %s planned %d sites, modified=%s", self.spec.name, len(self.plan.sites), self.modified)
        if self.modified and log.isEnabledFor(logging.DEBUG):
            log.debug("velora_fx: rewritten joint graph of %s:\n%s", self.spec.name, graph)

    def uuid(self) -> str:
        extra = json.dumps({"config": self.config.to_dict(), "spec": self.spec.key_dict()}, sort_keys=True)
        return ti.hash_files(_SOURCES, extra)
