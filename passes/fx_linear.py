"""FX route: rewrite the linear layers of a ``torch.fx.GraphModule`` to keep projections instead of their inputs.

Runs on graphs at the torch level (``torch.fx.symbolic_trace``): sites are
``call_module`` ``nn.Linear`` and the torch-level matmuls of
``passes/sites.py`` whose weight operand is a 2-D parameter, directly or
transposed (``F.linear``, ``x @ W``, ``x @ W.t()``, ``addmm(b, x, W)``).

Plan, then apply:

* ``plan`` decides every candidate (compressed or skipped, with the reason)
  without touching the graph. Sites are grouped by their input node: as in
  the compile backend (NOTE [one basis per input] in ``velora_fx/runtime.py``)
  the weights reading one input share one basis and keep one ``p``, and the
  input is compressed only if every site reading it can be (otherwise an
  exact site keeps it anyway).
* ``apply`` inserts, per compressed input, ``p = velora_fx.fx.project(state,
  x, W)`` before its first site, and replaces each site by
  ``velora_fx.fx.linear(state, x, p, W, b)``; ``state`` is the model's
  ``ProjectionState`` (``gm.velora_fx``). What the graph calls and how a
  projection is bound is the FX route's (``FxRuntime``, from
  ``velora_fx/fx.py``): this pass knows no state.

Every decided node carries ``node.meta[META_KEY]["record"]`` (a
``SiteRecord``), so a second run finds nothing new and reports
``modified=False``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from velora_fx.codec import Estimator
from velora_fx.passes.sites import META_KEY, is_transpose_2d, torch_site
from velora_fx.records import COMPRESSED, SKIPPED, SiteRecord

__all__ = ["Site", "FxRuntime", "plan", "apply", "velora_linear_pass", "GRAPH_NAME"]

log = logging.getLogger(__name__)

GRAPH_NAME = "fx"


@dataclass(frozen=True)
class Site:
    """A candidate matmul ``y = x @ op(W) (+ b)`` of a parameter ``W``."""

    node: fx.Node
    x: Any  # the input argument (usually an fx.Node)
    weight_name: str  # qualified parameter name, as in named_parameters()
    weight: torch.Tensor
    weight_node: Optional[fx.Node]  # its get_attr node; None for call_module nn.Linear
    bias: Any  # argument of the bias (fx.Node / None), or the qualified name of a module's bias
    weight_is_out_by_in: bool  # W is (out, D) as in nn.Linear; else (D, out)
    dead_after: tuple[fx.Node, ...] = ()  # nodes only this site used (a transpose of W)
    unsupported: Optional[str] = None

    @property
    def features(self) -> int:
        return self.weight.shape[1] if self.weight_is_out_by_in else self.weight.shape[0]


@dataclass(frozen=True)
class FxRuntime:
    """What the rewritten graph calls, and how a site's projection is made: given by the FX route."""

    state_attr: str  # the GraphModule's attribute holding the state, read with get_attr
    project: Callable[..., Any]  # project(state, x, W, *, name, site) -> p
    linear: Callable[..., Any]  # linear(state, x, p, W, b, *, name, site, weight_is_out_by_in)
    bind: Callable[[str, str, int], None]  # bind(weight, leader, D): create or check the projections


def _get_attr_param(gm: fx.GraphModule, node: Any) -> Optional[tuple[str, torch.Tensor]]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        return node.target, gm.get_parameter(node.target)
    except AttributeError:
        return None


def _resolve_weight(gm: fx.GraphModule, arg: Any) -> Optional[tuple[fx.Node, str, torch.Tensor, bool, tuple]]:
    """``arg`` as ``(get_attr node, name, parameter, transposed, dead nodes)`` if it is ``W`` or ``W.t()``."""
    found = _get_attr_param(gm, arg)
    if found is not None:
        return arg, found[0], found[1], False, ()
    if isinstance(arg, fx.Node) and is_transpose_2d(arg):
        found = _get_attr_param(gm, arg.args[0])
        if found is not None:
            return arg.args[0], found[0], found[1], True, ((arg,) if len(arg.users) == 1 else ())
    return None


def candidate(gm: fx.GraphModule, node: fx.Node) -> Optional[Site]:
    """The site ``node`` is, if it is a matmul of a parameter; else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            return None
        name = f"{node.target}.weight"
        if type(module).forward is not nn.Linear.forward:
            return Site(node, None, name, module.weight, None, None, True,
                        unsupported=f"{type(module).__qualname__} overrides nn.Linear.forward")  # fmt: skip
        bias = None if module.bias is None else f"{node.target}.bias"
        return Site(node, node.args[0], name, module.weight, None, bias, True)
    site = torch_site(node)
    if site is None:
        return None
    if set(node.kwargs) - {"input", "weight", "bias"}:  # addmm(..., beta=, alpha=), out=: not a plain linear
        return None
    resolved = _resolve_weight(gm, site.weight)
    if resolved is not None:
        weight_node, name, weight, transposed, dead = resolved
        return Site(node, site.x, name, weight, weight_node, site.bias, site.weight_is_out_by_in != transposed,
                    dead_after=dead)  # fmt: skip
    resolved = _resolve_weight(gm, site.x)
    if resolved is not None:
        return Site(node, site.weight, resolved[1], resolved[2], None, None, False,
                    unsupported="the parameter is the left operand (W @ x)")  # fmt: skip
    return None


def _why_skipped(site: Site, codec: Callable[[str], Estimator], excluded: Callable[[str], str]) -> Optional[str]:
    if site.unsupported:
        return f"unsupported form: {site.unsupported}"
    weight = site.weight
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    if not weight.requires_grad:
        return "frozen weight (requires_grad=False): nothing is kept for dW"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    return excluded(site.weight_name) or codec(site.weight_name).basis_shape(site.features)[1] or None


# -- plan / apply -----------------------------------------------------------------------------


@dataclass
class Decision:
    site: Site
    record: SiteRecord
    leader: Optional[str] = None  # the weight whose basis this site uses (itself when it leads)
    group: Optional[int] = None  # sites of one input and one leader keep one p


def plan(gm: fx.GraphModule, codec: Callable[[str], Estimator], excluded: Callable[[str], str]) -> list[Decision]:
    """Every undecided candidate of ``gm`` with its decision; the graph is not changed. ``codec(weight)``: the
    weight's codec (one estimator, the sizes may differ per weight); ``excluded(weight)``: why the config leaves a
    weight exact ("" if it does not)."""
    sites = []
    for node in gm.graph.nodes:
        if "record" in node.meta.get(META_KEY, {}):
            continue
        site = candidate(gm, node)
        if site is not None:
            sites.append((site, _why_skipped(site, codec, excluded)))
    by_input: dict[Any, list[tuple[Site, Optional[str]]]] = {}
    for site, reason in sites:
        if isinstance(site.x, fx.Node):
            by_input.setdefault(site.x, []).append((site, reason))
    decisions = []
    for site, reason in sites:
        estimator = codec(site.weight_name)
        basis_shape = None if reason else estimator.basis_shape(site.features)[0]
        group = by_input.get(site.x, [(site, reason)])
        if reason is None:
            # a frozen weight keeps nothing for dW: it does not keep the input either
            blocker = next(((s, r) for s, r in group if r is not None and s.weight.requires_grad), None)
            if blocker is not None:
                reason = f"the input is shared with {blocker[0].weight_name}, which stays exact ({blocker[1]})"
        leader = None
        if reason is None:  # one state and one p per input and size (VeloraConfig.overrides may give sizes apart)
            shared = [s for s, r in group if r is None and codec(s.weight_name).basis_shape(s.features)[0] == basis_shape]
            shared = shared if estimator.shares_per_input else [site]
            leader = shared[0].weight_name
        text = reason
        if reason is None:
            n = estimator.per_token(site.features, basis_shape)
            text = (f"input kept at {n:g} bits per element" if estimator.traced else
                    f"input kept as {n} projections per token")  # fmt: skip
            members = [s.weight_name for s in shared]
            if len(members) > 1:  # one text for the whole group: the report prints it once
                kept = "one set of codes" if estimator.traced else "one p"
                text += f"; {', '.join(members)} read one input and keep {kept}"
        record = SiteRecord(
            graph=GRAPH_NAME, node=site.node.name, weight=site.weight_name, status=SKIPPED if reason else COMPRESSED,
            reason=text, sub_token_size=None if basis_shape is None or estimator.traced else basis_shape[0],
            estimator=None if reason else estimator.name,
            per_token=None if reason else estimator.per_token(site.features, basis_shape),
            settings=None if reason else estimator.describe(basis_shape),
        )  # fmt: skip
        group = None if leader is None else id(site.x) if isinstance(site.x, fx.Node) else id(site)
        decisions.append(Decision(site, record, leader, None if group is None else hash((group, leader))))
    return decisions


def apply(gm: fx.GraphModule, decisions: list[Decision], runtime: FxRuntime) -> bool:
    """Rewrite the compressed sites of ``decisions``; tag every decided node. Returns whether anything changed."""
    if not decisions:
        return False
    graph = gm.graph
    groups: dict[int, list[Decision]] = {}
    for d in decisions:  # in graph order: a group's first decision is its first site
        d.site.node.meta.setdefault(META_KEY, {})["record"] = d.record
        if d.record.status == COMPRESSED:
            groups.setdefault(d.group, []).append(d)
    for members in groups.values():
        # resolved afresh: rewriting an earlier site replaces the node that is this site's input
        lead = candidate(gm, members[0].site.node)
        with graph.inserting_before(lead.node):
            state_node = graph.get_attr(runtime.state_attr)
            weight = lead.weight_node if lead.weight_node is not None else graph.get_attr(lead.weight_name)
            p = graph.call_function(runtime.project, (state_node, lead.x, weight),
                                    {"name": members[0].leader, "site": lead.node.name})  # fmt: skip
        for d in members:
            site = candidate(gm, d.site.node)
            runtime.bind(site.weight_name, d.leader, site.features)
            with graph.inserting_before(site.node):
                weight = site.weight_node if site.weight_node is not None else graph.get_attr(site.weight_name)
                bias = graph.get_attr(site.bias) if isinstance(site.bias, str) else site.bias
                new = graph.call_function(
                    runtime.linear,
                    (state_node, site.x, p, weight, bias),
                    {"name": site.weight_name, "site": site.node.name, "weight_is_out_by_in": site.weight_is_out_by_in},
                )
            new.meta.update(site.node.meta)
            site.node.replace_all_uses_with(new)
            graph.erase_node(site.node)
            for dead in site.dead_after:
                if not dead.users:
                    graph.erase_node(dead)
            log.debug("velora_fx: %s -> %s (%s)", d.record.node, new.format_node(), site.weight_name)
    graph.lint()
    gm.recompile()
    return True


def velora_linear_pass(gm: fx.GraphModule, codec: Callable[[str], Estimator], excluded: Callable[[str], str],
                       runtime: FxRuntime) -> PassResult:  # fmt: skip
    """The FX route as a pass: ``gm -> PassResult``; idempotent (a second run reports ``modified=False``)."""
    decisions = plan(gm, codec, excluded)  # codec: weight name -> its codec
    for d in decisions:
        log.info("velora_fx: %s %s (%s): %s", d.record.status, d.record.node, d.record.weight, d.record.reason)
    return PassResult(gm, apply(gm, decisions, runtime))
