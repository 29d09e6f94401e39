"""The ``torch.compile`` backend: Inductor, plus the VeLoRA rewrite of the joint graph.

What happens to one Dynamo graph (``docs/design.md`` draws the whole flow):

1. ``dynamo_graph``: find its trainable parameters and the matmuls each feeds;
   name each weight (its prepared model's name, else its Dynamo source).
2. Here: decide per weight whether it gets a projection basis, and give every
   group of weights reading one input one basis *input* (``ParamSlot``s of a
   ``GraphSpec``, ``passes/contract.py``); ``passes/dynamo_graph.py`` adds the
   per-step directions of ``init="batch_average"`` / ``"ema"``.
3. Inductor's ``compile_fx`` with the joint-graph pass
   (``passes/joint_graph.py``) first among its joint pre-passes, and the
   config's memory budget scoped to this compile; ``plan_store`` keeps the
   plan for compile-cache hits.
4. ``runtime.CompiledGraph`` wraps the result: it feeds the bases, calibrates
   them, and names the sites for ``velora_fx.report``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx import dynamo_graph, partition_summary, plan_store
from velora_fx.codec import Estimator
from velora_fx.config import VeloraConfig
from velora_fx.estimators import for_config, for_weight
from velora_fx.ops import refreshed_direction
from velora_fx.partition_summary import ForwardSummary, JointOutline
from velora_fx.passes.contract import GraphSpec, ParamSlot, RewriteOptions
from velora_fx.passes.dynamo_graph import insert_direction_refresh
from velora_fx.passes.joint_graph import VeloraJointPass
from velora_fx.runtime import CompiledGraph, distributed
from velora_fx.state import find_owner

__all__ = ["VeloraBackend", "make_backend", "backend", "rewrite_options"]

log = logging.getLogger(__name__)


class VeloraBackend:
    """A ``torch.compile`` backend: Inductor, plus the VeLoRA joint-graph rewrite. Build it with ``make_backend``."""

    def __init__(self, config: Optional[VeloraConfig] = None):
        if config is not None and not isinstance(config, VeloraConfig):
            raise ValueError(f"velora_fx.make_backend: config must be a VeloraConfig, got {type(config).__name__}")
        self.config = config if config is not None else VeloraConfig()
        self.__name__ = "velora_fx"
        self._graphs = 0

    def __repr__(self) -> str:
        return f"velora_fx.make_backend({self.config!r})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        unknown = set(kwargs) - {"mode", "options"}
        if unknown:
            raise ValueError(f"velora_fx backend: unexpected arguments {sorted(unknown)}; it takes mode= and options=")
        options = dict(kwargs.get("options") or {})
        named = options.pop(OPTIONS_KEY, None)
        if named is not None:  # torch.compile(model, backend="velora_fx", options={"velora_fx": {...}, ...})
            return make_backend(_config_from_options(named))(gm, example_inputs, mode=kwargs.get("mode"), options=options)
        patches = ti.mode_config_patches(kwargs.get("mode"), options or None)
        params = dynamo_graph.trainable_parameters(gm) if torch.is_grad_enabled() else []
        config = self.config
        if not params:  # no joint graph will be built: exactly what the default backend does (the budget aside)
            with ti.memory_budget_patch(config.memory_budget):
                return ti.compile_fx(gm, example_inputs, patches)
        return self._compile(gm, example_inputs, patches, params, config)

    def _compile(self, gm, example_inputs, patches, params, config: VeloraConfig) -> Callable:
        estimator = for_config(config)
        if estimator.refreshed_in_graph and distributed():
            raise ValueError(
                f"velora_fx: init={config.estimator.init!r} recomputes v from each rank's own batch inside the compiled "
                "graph, so the ranks of this torch.distributed job would train with different v; use "
                "init='batch_average_once' (calibrated once from the global first batch) or init='random' (seeded, "
                "the same on every rank)"
            )
        self._graphs += 1
        name = f"graph {gm.meta.get('dynamo_compile_id', self._graphs)}"
        uses = {i: dynamo_graph.param_uses(gm, i, node) for i, node, _ in params}
        num_inputs = len(gm.graph.find_nodes(op="placeholder"))
        slots, new_inputs = _slots(params, uses, config, estimator, num_inputs)
        new_gm, basis_nodes, examples = ti.copy_graph_module_with_inputs(gm, new_inputs, example_inputs)
        n_refresh = 0
        if estimator.refreshed_in_graph:
            basis_at = {num_inputs + j: node for j, node in enumerate(basis_nodes)}
            uses_by_primal = {i: u.uses for i, u in uses.items()}
            decay = config.estimator.ema_decay if config.estimator.init == "ema" else None
            n_refresh = insert_direction_refresh(new_gm, slots, uses_by_primal, basis_at, refreshed_direction, decay)
        spec = GraphSpec(name, num_inputs + len(new_inputs), tuple(slots))
        parameters = {i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))
                      if isinstance(ti.placeholder_example(n), torch.nn.Parameter)}  # fmt: skip
        compiled, sites, summary = _compile_with_pass(new_gm, examples, patches, spec, config, parameters)
        return CompiledGraph(compiled, gm, spec, uses, sites, n_refresh, estimator, summary)

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()``; nothing to drop (the state lives on the models)."""


def _slots(params, uses, config: VeloraConfig, estimator: Estimator, num_inputs: int):
    """One ``ParamSlot`` per trainable parameter, and the basis inputs to add (see NOTE [one basis per input] in
    ``runtime.py``)."""
    slots: list[ParamSlot] = []
    new_inputs: list[tuple[str, torch.Tensor]] = []
    leaders: dict[tuple, int] = {}  # (the input, the site's sizes) -> the slot that leads its state
    for i, node, param in params:
        use = uses[i]
        owner = find_owner(param)
        name = owner.name_of(param) if owner is not None else dynamo_graph.source_name(node)
        reason = config.why_excluded(name) or use.reason
        basis_shape = None
        if not reason:  # the site's own sizes (VeloraConfig.overrides); the lifecycle is the estimator's
            basis_shape, reason = for_weight(config, name).basis_shape(use.features)
        if reason:
            slots.append(ParamSlot(i, name, features=use.features, reason=reason))
            continue
        refreshed = estimator.refreshed_in_graph
        leader = leaders.get((use.inputs, basis_shape)) if estimator.shares_per_input else None
        if leader is not None:
            slots.append(ParamSlot(i, name, slots[leader].basis_primal, use.features, basis_shape, refreshed, leader=leader))
            continue
        basis_primal = num_inputs + len(new_inputs)
        state = torch.zeros(estimator.state_shape(basis_shape), dtype=torch.float32, device=param.device)
        new_inputs.append((f"velora_basis_{len(new_inputs)}", state))
        slots.append(ParamSlot(i, name, basis_primal, use.features, basis_shape, refreshed))
        leaders.setdefault((use.inputs, basis_shape), len(slots) - 1)
    return slots, new_inputs


def rewrite_options(config: VeloraConfig) -> RewriteOptions:
    """What the joint-graph pass needs of ``config``: its codec, scale and ``min_saved_bytes`` (the passes do not
    read configs)."""
    return RewriteOptions(codec=for_config(config), scale=config.scale, min_saved_bytes=config.min_saved_bytes,
                          key=config.to_dict())  # fmt: skip


def _compile_with_pass(gm, examples, patches, spec: GraphSpec, config: VeloraConfig, parameters: set[int]):
    """Inductor's compile with the joint-graph pass and the partition summary; the plan and the summary from the
    passes, or from the store on a compile-cache hit (where they do not run)."""

    def compile_once(caches: bool):
        joint_pass = VeloraJointPass(spec, rewrite_options(config))
        outline = JointOutline()
        summary = ForwardSummary(spec.name, outline, parameters, config.memory_budget)
        passes = ti.with_custom_passes(joint_custom_pre_pass=joint_pass, joint_custom_post_pass=outline,
                                       post_grad_custom_post_pass=summary)  # fmt: skip
        with ti.inductor_patch(**passes), ti.memory_budget_patch(config.memory_budget), ti.compile_caches(caches):
            return ti.compile_fx(gm, examples, patches), joint_pass, summary

    # the plan and the summary are stored together: the key covers what produces either
    uuid = VeloraJointPass(spec, rewrite_options(config)).uuid() + partition_summary.sources_uuid()
    key = plan_store.graph_key(gm, examples, uuid)
    compiled, joint_pass, summary = compile_once(caches=ti.compile_caches_enabled())
    if joint_pass.plan is None or not summary.ran:
        # A compile-cache hit, whole (AOTAutograd's cache: no pass ran) or partial (Inductor's FX graph cache served
        # the forward: the joint pass ran, the partition summary did not). What the passes found was stored.
        stored = plan_store.load(key)
        if stored is not None:
            sites = stored[0] if joint_pass.plan is None else joint_pass.plan.sites
            return compiled, sites, stored[1]
        log.info("velora_fx: %s came from the compile cache without its plan; recompiling it", spec.name)
        compiled, joint_pass, summary = compile_once(caches=False)
    plan_store.store(key, joint_pass.plan.sites, summary.summary)
    return compiled, joint_pass.plan.sites, summary.summary


def make_backend(config: Optional[VeloraConfig] = None) -> VeloraBackend:
    """A ``torch.compile`` backend that keeps projections instead of linear-layer inputs for ``dW``.

    Inductor compiles both halves as usual; one more joint-graph pass
    (``velora_fx.passes.joint_graph``, applied before the min-cut
    partitioner) rewrites every weight-gradient matmul whose stored input
    can be served from its projection ``p``. ``mode=`` and ``options=`` of
    ``torch.compile`` are honoured as the built-in Inductor backend does;
    graphs compiled without grad (``no_grad``, inference) are exactly the
    default backend's. ``config.memory_budget`` is applied to this backend's
    graphs only.

    Each compressed weight has a projection (VeLoRA: a unit vector ``v``),
    calibrated from the first training batch (the normalised mean sub-token
    of the weight's input, computed on the first call of the compiled graph)
    unless it is already calibrated (a loaded checkpoint). Where it lives is
    NOTE [the state model] in ``velora_fx/state.py``: in
    ``model.state_dict()`` under ``velora_fx.<weight>.v`` once the model is
    prepared (``velora_fx.prepare(model)``), else in a side table that does
    not outlive the model. Under ``torch.distributed`` every rank gets the
    same projection (NOTE [one basis on every rank] in ``runtime.py``).

    Args:
        config: what to compress and how; ``VeloraConfig()`` when omitted.
            Equal configs get one backend object: Dynamo keys its compiled
            code on the backend, so a backend built per model (30 models,
            one config) reuses one compiled graph instead of recompiling
            per model until Dynamo's recompile limit silently runs the rest
            without velora_fx. A different config is a different backend,
            and Dynamo compiles afresh for it.

    Returns:
        A callable to pass as ``torch.compile(..., backend=...)``.

    By name: installing velora_fx registers ``velora_fx.backend`` as the
    Dynamo backend ``"velora_fx"`` (entry point group
    ``torch_dynamo_backends``), and a config travels in ``options=`` under
    the key ``"velora_fx"`` (a ``VeloraConfig`` or its ``to_dict()``; the
    other keys stay Inductor's): ``torch.compile(model, backend="velora_fx",
    options={"velora_fx": {"estimator": {"name": "quantized", "bits": 2}}})``.

    Example::

        >>> cfg = velora_fx.VeloraConfig(num_groups=32, include=("*.down_proj.weight",))
        >>> model = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))   # doctest: +SKIP
        >>> model(x).sum().backward()                                                             # doctest: +SKIP
        >>> print(velora_fx.report(model))                                                        # doctest: +SKIP
    """
    config = VeloraConfig() if config is None else config
    if not isinstance(config, VeloraConfig):
        raise ValueError(f"velora_fx.make_backend: config must be a VeloraConfig, got {type(config).__name__}")
    return _BACKENDS.setdefault(config, VeloraBackend(config))


#: The key of ``torch.compile(..., options=)`` that holds velora_fx's config; the other keys are Inductor's.
OPTIONS_KEY = "velora_fx"


def _config_from_options(value: Any) -> VeloraConfig:
    if isinstance(value, VeloraConfig):
        return value
    if isinstance(value, dict):
        return VeloraConfig.from_dict(value)
    raise TypeError(
        f"velora_fx backend: options[{OPTIONS_KEY!r}] must be a VeloraConfig or its to_dict(), got "
        f"{type(value).__name__}; e.g. torch.compile(model, backend=\"velora_fx\", "
        f"options={{{OPTIONS_KEY!r}: {{\"estimator\": {{\"name\": \"quantized\", \"bits\": 2}}}}}})"
    )


_BACKENDS: dict[VeloraConfig, "VeloraBackend"] = {}  # one backend per config (configs are few and small)

#: ``torch.compile(model, backend=velora_fx.backend)``: the backend with ``VeloraConfig()`` defaults.
backend = make_backend()
