"""FX route: rewrite the linear layers of a ``torch.fx.GraphModule`` to keep VeLoRA projections.

Runs on graphs at the ``torch.nn`` level (``torch.fx.symbolic_trace``): sites
are ``call_module`` ``nn.Linear``, ``call_function`` ``F.linear`` and
``matmul`` / ``@`` / ``mm`` whose right operand is a 2-D parameter, directly
or transposed (``x @ W``, ``x @ W.t()``, ``x @ W.T``). Each compressed site
becomes a ``call_module`` of a ``VeloraProjection`` (one per weight, under the
child ``velora_fx`` of the GraphModule), which keeps only the projections for
``dW`` during training and is the plain op otherwise.

Plan, then apply: ``plan`` decides every candidate (compressed or skipped,
with the reason) without touching the graph; ``apply`` rewrites. Every node
decided carries ``node.meta["velora_fx"]`` (a ``SiteRecord``), so a second run
finds nothing new and reports ``modified=False``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from velora_fx.config import VeloraConfig
from velora_fx.projection import VeloraProjection
from velora_fx.report import COMPRESSED, SKIPPED, SiteRecord

__all__ = ["Site", "plan", "apply", "velora_linear_pass", "CONTAINER", "META_KEY"]

log = logging.getLogger(__name__)

CONTAINER = "velora_fx"  # child module of the GraphModule holding one VeloraProjection per weight
META_KEY = "velora_fx"  # node.meta key: the SiteRecord of every decided node
GRAPH_NAME = "fx"

_LINEAR_FNS = (F.linear, torch._C._nn.linear)
_MATMUL_FNS = (operator.matmul, torch.matmul, torch.mm)
_TRANSPOSE_FNS = (torch.t, torch.transpose)


@dataclass(frozen=True)
class Site:
    """A candidate matmul ``y = x @ op(W) (+ b)`` of a parameter ``W``."""

    node: fx.Node
    x: Any  # the input argument (usually an fx.Node)
    weight_name: str  # qualified parameter name, as in named_parameters()
    weight: torch.Tensor
    weight_node: Optional[fx.Node]  # its get_attr node; None for call_module nn.Linear
    bias: Any  # argument of the bias (fx.Node / None)
    weight_is_out_by_in: bool  # W is (out, D) as in nn.Linear; else (D, out)
    dead_after: tuple[fx.Node, ...] = ()  # nodes only this site used (a transpose of W)
    unsupported: Optional[str] = None


# -- small predicates -------------------------------------------------------------------------


def _get_attr_param(gm: fx.GraphModule, node: Any) -> Optional[tuple[str, torch.Tensor]]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return node.target, value


def _is_transpose_2d(node: fx.Node) -> bool:
    """``W.t()``, ``W.T``, ``W.transpose(0, 1)`` and friends on a 2-D tensor."""
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_function" and node.target is torch.t:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return True
    is_transpose = (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target is torch.transpose
    )
    return is_transpose and {d % 2 for d in node.args[1:3] if isinstance(d, int)} == {0, 1} and len(node.args) == 3


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _resolve_weight(gm: fx.GraphModule, arg: Any) -> Optional[tuple[fx.Node, str, torch.Tensor, bool, tuple]]:
    """``arg`` as ``(get_attr node, name, parameter, transposed, dead nodes)`` if it is ``W`` or ``W.t()``."""
    found = _get_attr_param(gm, arg)
    if found is not None:
        return arg, found[0], found[1], False, ()
    if isinstance(arg, fx.Node) and _is_transpose_2d(arg):
        found = _get_attr_param(gm, arg.args[0])
        if found is not None:
            return arg.args[0], found[0], found[1], True, ((arg,) if len(arg.users) == 1 else ())
    return None


def _candidate(gm: fx.GraphModule, node: fx.Node) -> Optional[Site]:
    """The site ``node`` is, if it is a matmul of a parameter; else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            return None
        name = f"{node.target}.weight"
        if type(module).forward is not nn.Linear.forward:
            return Site(node, None, name, module.weight, None, None, True,
                        unsupported=f"{type(module).__qualname__} overrides nn.Linear.forward")
        bias = None if module.bias is None else f"{node.target}.bias"
        return Site(node, node.args[0], name, module.weight, None, bias, True)
    if node.op == "call_function" and node.target in _LINEAR_FNS:
        resolved = _resolve_weight(gm, _arg(node, 1, "weight"))
        if resolved is None:
            return None
        weight_node, name, weight, transposed, dead = resolved
        return Site(node, _arg(node, 0, "input"), name, weight, weight_node, _arg(node, 2, "bias"),
                    not transposed, dead_after=dead)
    is_matmul = (node.op == "call_function" and node.target in _MATMUL_FNS) or (
        node.op == "call_method" and node.target == "matmul"
    )
    if not is_matmul or len(node.args) < 2:
        return None
    lhs, rhs = node.args[0], node.args[1]
    resolved = _resolve_weight(gm, rhs)
    if resolved is not None:
        weight_node, name, weight, transposed, dead = resolved
        return Site(node, lhs, name, weight, weight_node, None, transposed, dead_after=dead)
    resolved = _resolve_weight(gm, lhs)
    if resolved is not None:
        return Site(node, rhs, resolved[1], resolved[2], None, None, False,
                    unsupported="the parameter is the left operand (W @ x)")
    return None


def _why_skipped(site: Site, config: VeloraConfig) -> Optional[str]:
    if site.unsupported:
        return f"unsupported form: {site.unsupported}"
    weight = site.weight
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    if not weight.requires_grad:
        return "frozen weight (requires_grad=False): nothing is kept for dW"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    excluded = config.why_excluded(site.weight_name)
    if excluded:
        return excluded
    return config.why_not_splittable(_features(site))


def _features(site: Site) -> int:
    return site.weight.shape[1] if site.weight_is_out_by_in else site.weight.shape[0]


def _module_key(weight_name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", weight_name)
    candidate, n = key, 1
    while candidate in taken:
        n += 1
        candidate = f"{key}_{n}"
    return candidate


# -- plan / apply -----------------------------------------------------------------------------


def plan(gm: fx.GraphModule, config: VeloraConfig) -> list[tuple[Site, SiteRecord]]:
    """Every undecided candidate of ``gm`` with its decision; the graph is not changed."""
    decisions = []
    for node in gm.graph.nodes:
        if META_KEY in node.meta:
            continue
        site = _candidate(gm, node)
        if site is None:
            continue
        reason = _why_skipped(site, config)
        d = None if reason else config.sub_token_size_for(_features(site))
        record = SiteRecord(
            graph=GRAPH_NAME,
            node=node.name,
            weight=site.weight_name,
            status=SKIPPED if reason else COMPRESSED,
            reason=reason or f"input kept as {-(-_features(site) // d)} projections per token",
            sub_token_size=d,
        )
        decisions.append((site, record))
    return decisions


def _container(gm: fx.GraphModule) -> nn.Module:
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.Module())
    return getattr(gm, CONTAINER)


def _check_same_config(gm: fx.GraphModule, config: VeloraConfig) -> None:
    container = getattr(gm, CONTAINER, None)
    for name, proj in (container.named_children() if container is not None else ()):
        if isinstance(proj, VeloraProjection) and proj.config != config:
            raise ValueError(
                f"velora_fx.transform: this GraphModule was already transformed with {proj.config} "
                f"(see {CONTAINER}.{name}); transforming it again with {config} would mix two configs. "
                "Transform a fresh trace of the model instead."
            )


def apply(gm: fx.GraphModule, decisions: list[tuple[Site, SiteRecord]], config: VeloraConfig) -> bool:
    """Rewrite the compressed sites of ``decisions``; tag every decided node. Returns whether anything changed."""
    if not decisions:
        return False
    container = _container(gm)
    # One projection per weight and feature size (a weight used as both W and W.t() has two).
    by_weight: dict[tuple[str, int], str] = {
        (proj.weight_name, proj.features): key
        for key, proj in container.named_children()
        if isinstance(proj, VeloraProjection)
    }
    graph = gm.graph
    for planned, record in decisions:
        node = planned.node
        site = _candidate(gm, node)  # fresh: earlier rewrites may have replaced its input
        if record.status != COMPRESSED:
            node.meta[META_KEY] = record
            continue
        key = by_weight.get((site.weight_name, _features(site)))
        if key is None:
            key = _module_key(site.weight_name, set(by_weight.values()))
            container.add_module(key, VeloraProjection(site.weight_name, _features(site), record.sub_token_size, config))
            by_weight[(site.weight_name, _features(site))] = key
        with graph.inserting_before(node):
            weight = site.weight_node if site.weight_node is not None else graph.get_attr(site.weight_name)
            bias = graph.get_attr(site.bias) if isinstance(site.bias, str) else site.bias
            new = graph.call_module(
                f"{CONTAINER}.{key}",
                args=(site.x, weight, bias),
                kwargs={"site": node.name, "weight_is_out_by_in": site.weight_is_out_by_in},
            )
        new.meta.update(node.meta)
        new.meta[META_KEY] = record
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for dead in site.dead_after:
            if not dead.users:
                graph.erase_node(dead)
        log.debug("velora_fx: %s -> %s (%s, d=%s)", record.node, new.format_node(), site.weight_name, record.sub_token_size)
    graph.lint()
    gm.recompile()
    return True


def velora_linear_pass(gm: fx.GraphModule, config: VeloraConfig) -> PassResult:
    """The FX route as a pass: ``gm -> PassResult``; idempotent (a second run reports ``modified=False``)."""
    _check_same_config(gm, config)
    decisions = plan(gm, config)
    for _, record in decisions:
        log.info("velora_fx: %s %s (%s): %s", record.status, record.node, record.weight, record.reason)
    return PassResult(gm, apply(gm, decisions, config))


def records(gm: fx.GraphModule) -> list[SiteRecord]:
    """The decisions recorded in ``gm``'s graph, sized with the inputs seen so far.

    Sites that share one input (q/k/v projections of one normed tensor) count
    its bytes once, on the first of them.
    """
    out = []
    first_user: dict[Any, str] = {}
    for node in gm.graph.nodes:
        record = node.meta.get(META_KEY)
        if record is None:
            continue
        if record.status == COMPRESSED and node.op == "call_module":
            proj = gm.get_submodule(node.target)
            shape, dtype, before, after = proj.kept_bytes(record.node)
            changes = {"input_shape": shape, "dtype": dtype, "bytes_before": before, "bytes_after": after}
            if before is not None and before < proj.config.min_saved_bytes:
                changes.update(status=SKIPPED, reason=f"below min_saved_bytes ({before} < {proj.config.min_saved_bytes})")
            elif before is not None and node.args[0] in first_user:
                changes.update(bytes_before=0, bytes_after=after,
                               reason=f"{record.reason}; input shared with {first_user[node.args[0]]} (counted there)")
            first_user.setdefault(node.args[0], record.node)
            record = dataclasses.replace(record, **changes)
        out.append(record)
    return out
