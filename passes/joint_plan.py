"""Planning the VeLoRA rewrite of a joint forward+backward aten graph: which stored inputs are compressed, and why.

``plan_joint_graph`` finds every *site* (an aten matmul in the forward whose
weight operand traces back, through the weight chain of ``passes/sites.py``,
to a trainable parameter input) and decides **per stored tensor** ``X`` (the
left operand with its views peeled off) whether it can be compressed: only
when every backward use of ``X`` is a weight-gradient matmul of a site that has
a projection basis. The plan is data: one ``PlannedSite`` per site, with
status, reason and bytes; nothing in the graph changes
(``joint_rewrite.py`` applies it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx.codec import Estimator as Codec
from velora_fx.passes.contract import GraphSpec, ParamSlot, PlannedSite, RewriteOptions, escape
from velora_fx.passes.direction_op import DIRECTION_OP
from velora_fx.passes.graph_writer import val
from velora_fx.passes.sites import ATEN_INPUT_CHAIN, ATEN_MATMULS, ATEN_VIEWS, ATEN_WEIGHT_CHAIN, META_KEY
from velora_fx.records import COMPRESSED, SKIPPED, input_bytes

__all__ = ["JointPlan", "plan_joint_graph", "shape_hint"]

aten = torch.ops.aten



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


def shape_hint(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(ti.size_hint(s) for s in val(node).shape)


def _static_dim(value: Any) -> Optional[int]:
    return None if ti.is_symbolic(value) else int(value)


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if node.op == "call_function" else node.op


def _trace_back(node: Any, chain_ops: frozenset) -> tuple[Any, list[torch.fx.Node]]:
    """Follow ``node``'s first argument through ``chain_ops``; the source and the chain (source first)."""
    chain: list[torch.fx.Node] = []
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in chain_ops:
        if node.target is aten.expand.default and list(val(node).shape) != list(val(node.args[0]).shape):
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


def plan_joint_graph(graph: torch.fx.Graph, spec: GraphSpec, options: RewriteOptions) -> JointPlan:
    """Decide, for every site of a joint graph, whether its stored input is compressed, and why.

    Args:
        graph: the joint forward+backward graph (AOTAutograd's, post-decomposition, with its input and
            output descriptors).
        spec: the graph's inputs as the backend built them.
        options: the codec and ``min_saved_bytes`` (which weights to compress is already in ``spec``).

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
        site = _Site(node, k, x, left, _static_dim(val(left).shape[-1]))
        site.reason = _why_not(site, slot, g)
        sites.append(site)

    # 2. per stored tensor: compress only when every backward use is a weight gradient served from p
    by_x: dict[torch.fx.Node, list[_Site]] = {}
    for site in sites:
        if site.x is not None:
            by_x.setdefault(site.x, []).append(site)
    groups: dict = {}
    for x, xs in by_x.items():
        consumers, reason, related = _decide(x, xs, spec, options, g)
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
    return JointPlan(_records(sites, by_x, groups, spec, options.codec), groups, markers)


def _why_not(site: _Site, slot: ParamSlot, g: _Graph) -> str:
    """Why one site cannot be compressed on its own ("" if it can, as far as the site alone tells)."""
    left, x, features = site.left, site.x, site.features
    if slot.basis_primal is None:
        return escape(slot.reason or "the weight has no projection basis")
    if features is None:
        return "the contraction size is symbolic"
    if not val(left).dtype.is_floating_point:
        return f"the input is {val(left).dtype}: only real floating-point inputs are compressed"
    if slot.features != features:
        return f"the basis is sized for D={slot.features}, this matmul contracts D={features}"
    if _static_dim(val(x).shape[-1]) != features:
        storage, _ = _trace_back(left, ATEN_VIEWS)
        return g.kept_anyway(storage) or (
            f"the contraction (D={features}) is not over the last dim of the stored input "
            f"{x.name} {tuple(shape_hint(x))}"
        )
    if val(x).dim() > 0 and val(x).shape[-1] != 1 and _static_dim(val(x).stride()[-1]) != 1:
        return f"the stored input {x.name} is not contiguous in its last dim"
    return ""


def _decide(x, xs: list[_Site], spec: GraphSpec, options: RewriteOptions, g: _Graph):
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
    nbytes = input_bytes(shape_hint(x), val(x).dtype)
    if nbytes < options.min_saved_bytes:
        return None, f"the input keeps {nbytes} bytes < min_saved_bytes={options.min_saved_bytes}", ()
    return consumers, "", ()


def _records(sites: list[_Site], by_x, groups, spec: GraphSpec, codec: Codec) -> list[PlannedSite]:
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
        shape, dtype = shape_hint(x), val(x).dtype
        before = after = input_bytes(shape, dtype)
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
                kept = len({spec.slots[k].basis_primal for k in group})  # per-weight sizes may set some apart
                each, many = ("set of codes", "sets of codes") if codec.traced else ("p", "p")
                names = ", ".join(f"{{{i}}}" for i in range(len(group)))
                how = (f"and keep one {each}" if kept == 1 else f"(a {each} each)" if kept == len(group)
                       else f"and keep {kept} {many}, one per size")  # fmt: skip
                reason = f"compressed; {names} read one input {how} (its bytes counted on the first)"
                related = tuple(group)
        per_token = codec.per_token(shape[-1], slot.basis_shape) if compressed else None
        settings = codec.describe(slot.basis_shape) if compressed else None
        sub_token = None if not compressed or codec.traced else slot.sub_token_size
        planned.append(PlannedSite(
            site.slot, site.node.name, COMPRESSED if compressed else SKIPPED, reason, related, shape,
            str(dtype).replace("torch.", ""), sub_token, before, after, codec.name if compressed else None, per_token,
            settings,
        ))  # fmt: skip
    return planned
