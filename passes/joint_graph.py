"""The VeLoRA rewrite of a joint forward+backward aten graph, before the partitioner.

Plan, then apply (see README.md beside this file for the invariants):

* ``plan_joint_graph`` finds every *site* (an ``aten.mm`` / ``addmm`` /
  ``bmm`` / ``linear`` in the forward whose weight operand traces back,
  through views, transposes, expands and dtype casts, to a trainable
  parameter input) and decides **per stored tensor** ``X`` (the left operand
  with its views peeled off) whether it can be compressed: only when every
  backward use of ``X`` is a weight-gradient matmul of a site that gets a
  projection direction ``v``. The plan is data: one ``SiteRecord`` per site,
  with status, reason and bytes.
* ``apply_joint_plan`` inserts ``p`` next to the forward matmul and ``x̂``
  before each weight-gradient use, so that the min-cut partitioner keeps
  ``p`` (or recomputes it) and drops ``X``.

See NOTE [VeLoRA weight gradient] in ``velora_fx/ops.py`` for the math; the
numbers here are the same as ``ops.project`` / ``ops.reconstruct`` (the last
sub-token zero-padded when ``d`` does not divide ``D``) up to float
re-association.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from velora_fx import _torch_internals as ti
from velora_fx.config import VeloraConfig
from velora_fx.report import COMPRESSED, SKIPPED, SiteRecord, kept_bytes
from velora_fx.report import __file__ as _REPORT_FILE

__all__ = [
    "ParamSlot",
    "GraphSpec",
    "PlannedSite",
    "JointPlan",
    "VeloraJointPass",
    "plan_joint_graph",
    "apply_joint_plan",
    "velora_joint_pass",
    "DIRECTION_OP",
    "META_KEY",
]

log = logging.getLogger(__name__)

aten = torch.ops.aten
prims = torch.ops.prims

#: ``node.meta`` key of every node this pass inserted or rewrote.
META_KEY = "velora_fx_joint"


# -- the marker op of a per-step direction ----------------------------------------
#
# Under init="batch_average" / "ema" the backend computes ``v_t`` for this step
# inside the Dynamo graph and wraps it in this op (also returned as an extra
# output, so the runtime wrapper can write it into the buffer). The pass finds
# the op by its ``slot`` argument (the position of the ``v`` input it replaces,
# shared by every weight using that ``v``), uses its input as the direction of
# those weights' sites, and removes it. Should the pass not run, Inductor falls back
# to the eager kernel: a copy, still correct.


@torch.library.custom_op("velora_fx::direction", mutates_args=())
def _direction(v: torch.Tensor, slot: int) -> torch.Tensor:
    """Marks ``v`` as this step's value of the direction input at position ``slot`` (a copy)."""
    return v.clone()


@_direction.register_fake
def _(v: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(v)


DIRECTION_OP = torch.ops.velora_fx.direction.default


# -- what the backend tells the pass ----------------------------------------------------


@dataclass(frozen=True)
class ParamSlot:
    """A trainable parameter input of the graph and, when it has one, its direction ``v``.

    ``primal`` and ``v_primal`` are positions among the graph's inputs (the
    joint graph's ``primals_*`` in order). ``v_primal is None`` means the
    parameter has no ``v`` (``reason`` says why); its sites stay exact.
    ``shares`` names the parameter whose ``v`` this one uses (same
    ``v_primal``) when both read the same input: see NOTE [one v per input]
    in ``velora_fx/compile_backend.py``; their sites on that input then keep
    one ``p``.
    """

    primal: int
    fqn: str
    v_primal: Optional[int] = None
    features: Optional[int] = None
    sub_token_size: Optional[int] = None
    refreshed: bool = False
    reason: str = ""
    shares: str = ""


@dataclass(frozen=True)
class GraphSpec:
    """The inputs of one graph as the backend built them: how many, and the parameter slots."""

    name: str
    num_inputs: int
    slots: tuple[ParamSlot, ...]

    def key_dict(self) -> dict[str, Any]:
        """What the rewrite depends on (the graph's name is not part of it)."""
        return {"num_inputs": self.num_inputs, "slots": [dataclasses.asdict(s) for s in self.slots]}


@dataclass(frozen=True)
class PlannedSite:
    """One forward matmul of the plan: the record, and the slot of its weight (``-1`` if none)."""

    slot: int
    record: SiteRecord


@dataclass
class JointPlan:
    """The plan of one joint graph: every site with its decision, and what to rewrite.

    ``groups`` maps a compressed stored tensor to, per weight slot, the forward
    sites and the weight-gradient consumers ``(consumer, view chain from X)``.
    """

    sites: list[PlannedSite]
    groups: dict[torch.fx.Node, dict[int, tuple[list[torch.fx.Node], list[tuple[torch.fx.Node, list[torch.fx.Node]]]]]]
    markers: list[torch.fx.Node]

    @property
    def records(self) -> list[SiteRecord]:
        return [s.record for s in self.sites]


# -- small predicates ------------------------------------------------------------

_MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1), aten.linear.default: (0, 1)}

# Ops a weight flows through between the parameter input and the matmul.
_WEIGHT_CHAIN = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.expand.default,
    aten.alias.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten._to_copy.default,
    prims.convert_element_type.default,
}

# Ops from a stored input to the matmul that keep its last dimension's rows intact.
_INPUT_CHAIN = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}

# Pure views: re-applied to ``x̂`` with the same arguments where a backward use reads a view of ``X``.
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.alias.default,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
}


def _is_tangent(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("tangents")


def _is_primal(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and not _is_tangent(node)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _shape_hint(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(ti.size_hint(s) for s in _val(node).shape)


def _static_dim(value: Any) -> Optional[int]:
    return None if ti.is_symbolic(value) else int(value)


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if node.op == "call_function" else node.op


# -- plan ------------------------------------------------------------------------


def _trace_back(node: Any, chain_ops: set) -> tuple[Any, list[torch.fx.Node]]:
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
            if u.op == "call_function" and u.target in _VIEWS and u.args[0] is n:
                walk(u, chain + [u])
            elif u not in forward:
                uses.append((u, chain))

    walk(x, [])
    return uses


def plan_joint_graph(graph: torch.fx.Graph, spec: GraphSpec, config: VeloraConfig) -> JointPlan:
    """Decide, for every site of a joint graph, whether its stored input is compressed, and why.

    Args:
        graph: the joint forward+backward graph (AOTAutograd's, post-decomposition).
        spec: the graph's inputs as the backend built them.
        config: what to compress.

    Returns:
        A ``JointPlan``; nothing in ``graph`` is changed.
    """
    markers = list(graph.find_nodes(op="call_function", target=DIRECTION_OP))
    primals = [n for n in graph.find_nodes(op="placeholder") if _is_primal(n)]
    output = graph.output_node()
    outs = list(output.args[0])
    if len(primals) != spec.num_inputs or len(outs) < len(primals):
        log.warning(
            "velora_fx.passes.joint_graph: %s has %d inputs and %d outputs, the backend built %d inputs; "
            "leaving it exact",
            spec.name,
            len(primals),
            len(outs),
            spec.num_inputs,
        )
        return JointPlan([], {}, markers)
    num_fw = len(outs) - len(primals)
    grad_of = {i: outs[num_fw + i] for i in range(len(primals))}
    forward = _forward_nodes(graph, outs[:num_fw])
    slot_of_primal = {primals[s.primal]: (k, s) for k, s in enumerate(spec.slots)}
    trainable = lambda node: node in slot_of_primal and grad_of[spec.slots[slot_of_primal[node][0]].primal] is not None  # noqa: E731

    # 1. sites, each with its per-site verdict
    sites: list[dict[str, Any]] = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _MATMULS or node not in forward:
            continue
        if node.meta.get(META_KEY, {}).get("site"):
            continue  # rewritten by an earlier run: idempotent
        li, wi = _MATMULS[node.target]
        left, right = node.args[li], node.args[wi]
        weight, _ = _trace_back(right, _WEIGHT_CHAIN)
        if not trainable(weight):
            other, _ = _trace_back(left, _WEIGHT_CHAIN)
            if trainable(other):
                k, slot = slot_of_primal[other]
                sites.append(
                    dict(node=node, slot=k, fqn=slot.fqn, x=None, reason=f"the weight is the left operand of {_op_name(node)}")
                )
            continue
        k, slot = slot_of_primal[weight]
        x, in_chain = _trace_back(left, _INPUT_CHAIN)
        features = _static_dim(_val(left).shape[-1])
        site = dict(node=node, slot=k, fqn=slot.fqn, x=x, left=left, features=features, reason="")
        if config.why_excluded(slot.fqn):
            site["reason"] = config.why_excluded(slot.fqn)
        elif slot.v_primal is None:
            site["reason"] = slot.reason or "the weight has no projection direction"
        elif features is None:
            site["reason"] = "the contraction size is symbolic"
        elif not _val(left).dtype.is_floating_point:
            site["reason"] = f"the input is {_val(left).dtype}: only real floating-point inputs are compressed"
        elif slot.features != features:
            site["reason"] = f"v is sized for D={slot.features}, this matmul contracts D={features}"
        elif config.sub_token_size_for(features) is None:
            site["reason"] = f"D={features} is too small to split ({config.num_groups or config.sub_token_size} needed)"
        elif _static_dim(_val(x).shape[-1]) != features:
            storage, _ = _trace_back(left, _VIEWS)
            kept = _kept_anyway(storage, forward, output, num_fw)
            site["reason"] = kept or (
                f"the contraction (D={features}) is not over the last dim of the stored input "
                f"{x.name} {tuple(_shape_hint(x))}"
            )
        elif _val(x).dim() > 0 and _val(x).shape[-1] != 1 and _static_dim(_val(x).stride()[-1]) != 1:
            site["reason"] = f"the stored input {x.name} is not contiguous in its last dim"
        sites.append(site)

    # 2. per stored tensor: compress only when every backward use is a weight gradient served from p
    by_x: dict[torch.fx.Node, list[dict[str, Any]]] = {}
    for site in sites:
        if site["x"] is not None:
            by_x.setdefault(site["x"], []).append(site)
    groups: dict[torch.fx.Node, dict[int, tuple[list[torch.fx.Node], list[tuple[torch.fx.Node, list[torch.fx.Node]]]]]] = {}
    for x, xs in by_x.items():
        verdict = _decide(x, xs, spec, config, forward, output, num_fw, primals)
        for site in xs:
            if not site["reason"]:
                site["reason"] = verdict["reason"]
        if verdict["consumers"] is not None and all(not s["reason"] for s in xs):
            group: dict[int, tuple[list[torch.fx.Node], list]] = {}
            for site in xs:
                group.setdefault(site["slot"], ([], []))[0].append(site["node"])
            for consumer, chain, k in verdict["consumers"]:
                group[k][1].append((consumer, chain))
            groups[x] = group

    # 3. records: the stored tensor's bytes are counted once, on its first site
    planned: list[PlannedSite] = []
    counted: set[torch.fx.Node] = set()
    projected: set[tuple[torch.fx.Node, Optional[int]]] = set()  # one p per (X, v)
    for site in sites:
        x = site["x"]
        compressed = x in groups
        status = COMPRESSED if compressed else SKIPPED
        reason = site["reason"] or ("compressed" if compressed else "")
        if x is None:
            planned.append(PlannedSite(site["slot"], SiteRecord(spec.name, site["node"].name, site["fqn"], SKIPPED, reason)))
            continue
        shape = _shape_hint(x)
        dtype = _val(x).dtype
        d = spec.slots[site["slot"]].sub_token_size if compressed else None
        before, after = kept_bytes(shape, dtype, d)
        v_key = (x, spec.slots[site["slot"]].v_primal)
        if x in counted:
            before, after = 0, (after if compressed and v_key not in projected else 0)
        elif compressed:
            before = kept_bytes(shape, dtype, None)[0]
        counted.add(x)
        if compressed:
            projected.add(v_key)
        if compressed and len(by_x[x]) > 1:
            others = sorted({s["fqn"] for s in by_x[x] if s is not site})
            reason = f"compressed; input shared with {', '.join(others)} (its bytes counted on the first site)"
            if spec.slots[site["slot"]].shares:
                reason += f"; v and p shared with {spec.slots[site['slot']].shares}"
        record = SiteRecord(
            graph=spec.name,
            node=site["node"].name,
            weight=site["fqn"],
            status=status,
            reason=reason,
            input_shape=shape,
            dtype=str(dtype).replace("torch.", ""),
            sub_token_size=d if compressed else config.sub_token_size_for(shape[-1]) if shape else None,
            bytes_before=before,
            bytes_after=after,
        )
        planned.append(PlannedSite(site["slot"], record))
    return JointPlan(planned, groups, markers)


def _kept_anyway(x: torch.fx.Node, forward, output, num_fw) -> str:
    """Why backward keeps ``x`` whatever is done to the weight gradients ("" if only weight gradients read it)."""
    for consumer, _ in _backward_uses(x, forward):
        reached = _reached_outputs(consumer, output)
        is_matmul = consumer.op == "call_function" and consumer.target in (aten.mm.default, aten.bmm.default)
        if not is_matmul or len(reached) != 1 or min(reached) < num_fw:
            return f"the input is kept for backward anyway: read by {consumer.format_node()}"
    return ""


def _decide(x, xs, spec, config, forward, output, num_fw, primals) -> dict[str, Any]:
    """Whether the stored tensor ``x`` of sites ``xs`` can be served from ``p`` in backward, and why not."""
    slot_of = {spec.slots[s["slot"]].primal: s["slot"] for s in xs}
    consumers = []
    for consumer, chain in _backward_uses(x, forward):
        reached = _reached_outputs(consumer, output)
        grads = {i - num_fw for i in reached if i >= num_fw}
        is_matmul = consumer.op == "call_function" and consumer.target in (aten.mm.default, aten.bmm.default)
        reads = chain[-1] if chain else x
        if not is_matmul or len(grads) != 1 or reached != {num_fw + g for g in grads}:
            reason = _kept_anyway(x, forward, output, num_fw)
            return dict(consumers=None, reason=reason or f"the input is read in backward by {consumer.format_node()}")
        (g,) = grads
        if g not in slot_of:
            return dict(consumers=None, reason=f"the input also feeds the gradient of input {g} ({consumer.name})")
        if sum(1 for a in consumer.args if a is reads) != 1:
            return dict(consumers=None, reason=f"{consumer.name} reads the input twice")
        consumers.append((consumer, chain, slot_of[g]))
    if not consumers:
        return dict(consumers=None, reason="the input is not kept for any weight gradient")
    ineligible = [s for s in xs if s["reason"]]
    if ineligible:
        s = ineligible[0]
        return dict(consumers=None, reason=f"the input is shared with {s['fqn']}, which stays exact ({s['reason']})")
    nbytes = kept_bytes(_shape_hint(x), _val(x).dtype, None)[0]
    if nbytes < config.min_saved_bytes:
        return dict(consumers=None, reason=f"the input keeps {nbytes} bytes < min_saved_bytes={config.min_saved_bytes}")
    return dict(consumers=consumers, reason="")


# -- apply -------------------------------------------------------------------------

_CARRIED_META = ("stack_trace", "nn_module_stack", "seq_nr", "partitioner_tag", "recompute", "ac_graph_id", "source_fn_stack")


class _Builder:
    """Inserts nodes with ``meta["val"]`` (min-cut sizes nodes with it) and provenance carried from a reference node."""

    def __init__(self, graph: torch.fx.Graph, like: torch.fx.Node, tag: str):
        self.graph, self.like, self.tag = graph, like, tag

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fake_args = torch.fx.node.map_arg(args, _val)
        fake_kwargs = torch.fx.node.map_arg(kwargs, _val)
        node.meta["val"] = target(*fake_args, **fake_kwargs)
        for key in _CARRIED_META:
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        node.meta[META_KEY] = {"role": self.tag}
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


# Every VeLoRA quantity below is one ``aten.mm`` with ``v`` as a column or a row:
# an extern kernel, nothing for Inductor to generate (when ``d`` divides ``D``:
# else the last sub-token is padded / cut, one small kernel). With
# ``X`` of shape ``(N, D)`` seen as ``N·n`` sub-tokens of ``d``:
#
#   p  = (X.view(N·n, d) @ v.view(d, 1)).view(N, n)         a matrix-vector product
#   x̂  = (p.view(N·n, 1) @ v.view(1, d)).view(N, D)         an outer product (K = 1)
#   dŴ = ((G p).view(out·n, 1) @ v.view(1, d)).view(out, D)  Gᵀ p first: N × n, not N × D
#
# Measured on the LLaMA-style stack of benchmarks/backend_bench.py (same
# runs): with the projection and the dW assembly as pointwise code, compile
# time 1.30-1.34x the default backend's (~5 more generated kernels per graph);
# as matmuls, 1.00x. The one thing pointwise code bought: min-cut may
# recompute a pointwise projection in backward from what it keeps anyway (the
# norm's input), while it never recomputes an mm, so p is saved: 0.725x vs
# 0.740x bytes kept there (p is N x n: 1/d of X; the gap shrinks as D grows).


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


def _spread(b: _Builder, q: torch.fx.Node, v: torch.fx.Node, features: int) -> torch.fx.Node:
    """``q`` of shape ``(R, n)`` spread over sub-tokens: ``(R, D)`` with ``q[r, j] · v`` at columns ``j·d …``."""
    d = int(_val(v).shape[0])
    n = int(_val(q).shape[-1])
    col = b(aten.view.default, q, [-1, 1])
    flat = b(aten.view.default, b(aten.mm.default, col, b(aten.view.default, v, [1, d])), [-1, n * d])
    return flat if n * d == features else b(aten.slice.Tensor, flat, 1, 0, features)


def _project(graph, x, v, site) -> torch.fx.Node:
    """``p`` of shape ``(N, n)`` (rows of ``X``, one column per sub-token), inserted before ``site``."""
    features = int(_val(x).shape[-1])
    d = int(_val(v).shape[0])
    with graph.inserting_before(site):
        b = _Builder(graph, site, "project")
        vv = _cast(b, v, _val(x).dtype)
        col = b(aten.mm.default, _sub_token_rows(b, x, d), b(aten.view.default, vv, [d, 1]))
        return b(aten.view.default, col, [-1, -(-features // d)])


def _reconstruct(graph, x, p, v, scale, before) -> torch.fx.Node:
    """``x̂ = scale · p ⊗ v`` blockwise, in the shape of ``x``, inserted before ``before``."""
    features = int(_val(x).shape[-1])
    with graph.inserting_before(before):
        b = _Builder(graph, before, "reconstruct")
        x_hat = _spread(b, _scaled(b, p, scale), _cast(b, v, _val(p).dtype), features)
        return b(aten.view.default, x_hat, [*_dims(b, x, _val(x).dim() - 1), features])


_ROW_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}
_TRANSPOSES_2D = {aten.t.default, aten.transpose.int, aten.permute.default}


def _as_rows(x: torch.fx.Node, chain: list[torch.fx.Node]) -> Optional[bool]:
    """How a weight-gradient ``mm`` reads ``X`` through ``chain``: ``False`` as ``X.view(N, D)``,
    ``True`` as its transpose ``(D, N)``, ``None`` for anything else (then ``x̂`` is rebuilt)."""
    features = _val(x).shape[-1]
    transposed = False
    for i, node in enumerate(chain):
        shape = _val(node).shape
        if node.target in _ROW_VIEWS and not transposed and shape[-1] == features:
            continue  # row-major views that keep the last dim keep the row order
        if node.target in _TRANSPOSES_2D and i == len(chain) - 1 and len(shape) == 2 and shape[0] == features:
            transposed = True
            continue
        return None
    if len(_val(chain[-1] if chain else x).shape) != 2:
        return None
    return transposed


def _weight_grad_from_p(graph, consumer, reads, chain, x, p, v, scale) -> Optional[torch.fx.Node]:
    """``dŴ`` of a weight-gradient ``mm`` computed from ``p`` without rebuilding ``x̂``, or ``None`` if its form is not
    one of ``mm(G, X.view(N, D))`` / ``mm(X.view(N, D).t(), G)``.

    See NOTE [VeLoRA weight gradient] in ``velora_fx/ops.py``: ``(Gᵀ p) ⊗ v`` blockwise, an ``N × n``
    contraction instead of ``N × D``.
    """
    if consumer.target is not aten.mm.default:
        return None
    transposed = _as_rows(x, chain)
    if transposed is None or consumer.args[1 if not transposed else 0] is not reads:
        return None
    features = int(_val(x).shape[-1])
    with graph.inserting_before(consumer):
        b = _Builder(graph, consumer, "weight_gradient")
        vv = _cast(b, v, _val(p).dtype)
        rows = _val(reads).shape[1 if transposed else 0]
        n_rows = _val(p).shape[0]
        static = not ti.is_symbolic(rows) and not ti.is_symbolic(n_rows)
        p2d = p
        if rows is not n_rows and not (static and int(rows) == int(n_rows)):  # sizes spelled differently
            p2d = b(aten.view.default, p, [_dims(b, reads, 2)[1 if transposed else 0], _val(p).shape[1]])
        g = consumer.args[0] if not transposed else b(aten.permute.default, consumer.args[1], [1, 0])  # (out, N)
        dw = _spread(b, _scaled(b, b(aten.mm.default, g, p2d), scale), vv, features)  # (out, D)
        return dw if not transposed else b(aten.permute.default, dw, [1, 0])


def apply_joint_plan(graph: torch.fx.Graph, plan: JointPlan, spec: GraphSpec, config: VeloraConfig) -> bool:
    """Rewrite ``graph`` as ``plan`` says; returns whether anything changed."""
    changed = False
    primals = [n for n in graph.find_nodes(op="placeholder") if _is_primal(n)]
    direction: dict[int, torch.fx.Node] = {}
    for marker in plan.markers:
        direction[int(marker.args[1])] = marker.args[0]
        marker.replace_all_uses_with(marker.args[0])
        graph.erase_node(marker)
        changed = True
    order = {n: i for i, n in enumerate(graph.nodes)}
    for x, group in plan.groups.items():
        first_site_of: dict[int, torch.fx.Node] = {}  # per v input: the first site of every slot using it
        for k, (fw_sites, _) in group.items():
            first = min(fw_sites, key=order.__getitem__)
            v_primal = spec.slots[k].v_primal
            if v_primal not in first_site_of or order[first] < order[first_site_of[v_primal]]:
                first_site_of[v_primal] = first
        projections: dict[torch.fx.Node, torch.fx.Node] = {}  # v -> p: weights sharing v share p
        for k, (fw_sites, consumers) in group.items():
            slot = spec.slots[k]
            v = direction.get(slot.v_primal) if slot.refreshed else primals[slot.v_primal]
            if v is None:
                log.warning("velora_fx: no direction marker for %s; its sites stay exact", slot.fqn)
                continue
            if v not in projections:
                projections[v] = _project(graph, x, v, first_site_of[slot.v_primal])
            p = projections[v]
            for site in fw_sites:
                site.meta[META_KEY] = {"site": slot.fqn}
            x_hat = None  # rebuilt only for weight gradients that cannot be served from p directly
            for consumer, chain in sorted(consumers, key=lambda c: order[c[0]]):
                reads = chain[-1] if chain else x
                dw = _weight_grad_from_p(graph, consumer, reads, chain, x, p, v, config.scale)
                if dw is not None:
                    dw.meta[META_KEY] = {"weight_gradient": slot.fqn}
                    consumer.replace_all_uses_with(dw)
                    graph.erase_node(consumer)
                    for dead in reversed(chain):
                        if not dead.users:
                            graph.erase_node(dead)
                    continue
                if x_hat is None:
                    x_hat = _reconstruct(graph, x, p, v, config.scale, consumer)
                y = x_hat
                with graph.inserting_before(consumer):
                    b = _Builder(graph, consumer, "reconstruct")
                    for view in chain:
                        y = b(view.target, y, *view.args[1:], **view.kwargs)
                consumer.replace_input_with(reads, y)
                consumer.meta[META_KEY] = {"weight_gradient": slot.fqn}
                for dead in reversed(chain):
                    if not dead.users:
                        graph.erase_node(dead)
            changed = True
    if changed:
        graph.lint()
    return changed


# -- the pass ----------------------------------------------------------------------


def velora_joint_pass(gm: torch.fx.GraphModule, spec: GraphSpec, config: VeloraConfig) -> tuple[PassResult, JointPlan]:
    """Plan and apply the VeLoRA rewrite on a joint graph module; a second run changes nothing.

    Returns ``PassResult(gm, modified)`` and the plan (its ``records`` are what ``velora_fx.report`` shows).
    """
    plan = plan_joint_graph(gm.graph, spec, config)
    modified = apply_joint_plan(gm.graph, plan, spec, config)
    if modified:
        gm.recompile()
    return PassResult(gm, modified), plan


_SOURCES = (__file__, _REPORT_FILE)  # what the rewrite and its records depend on


class VeloraJointPass(ti.CustomGraphPass):
    """``torch._inductor.config.joint_custom_pre_pass`` for one graph: plan + apply, plan kept in ``self.plan``.

    ``uuid()`` covers this file's source, the config and the graph's parameter
    slots, so an Inductor / AOTAutograd cache hit never serves a graph
    rewritten differently (or not at all).
    """

    def __init__(self, spec: GraphSpec, config: VeloraConfig):
        self.spec, self.config = spec, config
        self.plan: Optional[JointPlan] = None
        self.records: Optional[list[PlannedSite]] = None
        self.graph_dump: Optional[str] = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        try:
            plan = plan_joint_graph(graph, self.spec, self.config)
        except Exception:  # planning changes nothing: leave the graph exact rather than fail the compile
            log.warning("velora_fx: planning %s failed; it stays exact", self.spec.name, exc_info=True)
            plan = JointPlan([], {}, list(graph.find_nodes(op="call_function", target=DIRECTION_OP)))
        modified = apply_joint_plan(graph, plan, self.spec, self.config)
        self.plan, self.records = plan, list(plan.sites)
        if modified:
            self.graph_dump = str(graph)
        log.debug("velora_fx: %s planned %d sites, modified=%s", self.spec.name, len(plan.sites), modified)

    def uuid(self) -> str:
        extra = json.dumps({"config": self.config.to_dict(), "spec": self.spec.key_dict()}, sort_keys=True)
        return ti.hash_files(_SOURCES, extra)


def records_to_json(sites: Iterable[PlannedSite]) -> str:
    return json.dumps([{"slot": s.slot, "record": s.record.to_dict()} for s in sites])


def records_from_json(text: str) -> list[PlannedSite]:
    out = []
    for item in json.loads(text):
        rec = dict(item["record"])
        if rec.get("input_shape") is not None:
            rec["input_shape"] = tuple(rec["input_shape"])
        out.append(PlannedSite(int(item["slot"]), SiteRecord(**rec)))
    return out
