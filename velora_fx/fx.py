"""The FX route: ``transform`` a GraphModule, the two ops its rewritten graph calls, and its records.

``passes/fx_linear.py`` rewrites the graph; what runs at training time is
here: ``project`` (once per compressed input) and ``linear`` (once per site).
Both read the model's ``ProjectionState`` (NOTE [the state model] in
``state.py``). The rule of both routes: a site compresses whenever autograd
records its weight's gradient (grad mode on, the weight requiring grad), in
``train()`` and ``eval()`` alike; under ``no_grad`` / ``inference_mode`` it
is the plain op and does no projection work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from velora_fx.passes import fx_linear
from velora_fx.passes.sites import META_KEY

from . import lifecycle, ops
from .config import VeloraConfig
from .estimators import for_config, for_weight
from .records import COMPRESSED, SKIPPED, SiteRecord, input_bytes
from .state import CONTAINER, ProjectionState, prepare, strip_compiled

__all__ = ["transform", "project", "linear", "records", "calibrating"]

log = logging.getLogger(__name__)

# Set by ``calibrating()``: ``project`` calibrates even outside a training step.
_forced_calibration = False


@contextlib.contextmanager
def calibrating() -> Iterator[None]:
    """Within this context every uncalibrated projection calibrates on the next input it sees."""
    global _forced_calibration
    previous, _forced_calibration = _forced_calibration, True
    try:
        yield
    finally:
        _forced_calibration = previous


def _plain(x, weight, bias, weight_is_out_by_in: bool) -> torch.Tensor:
    return F.linear(x, weight if weight_is_out_by_in else weight.t(), bias)


@torch.compiler.disable(reason="velora_fx calibrates a projection eagerly on its first training batch; call "
                        "velora_fx.calibrate(model, batch) before compiling with fullgraph=True")  # fmt: skip
def _calibrate(state: ProjectionState, name: str, x: torch.Tensor, site: str) -> None:
    entry, est = state.get(name), for_config(state.config)
    basis_shape = _basis_shape(state, name)
    total, count = lifecycle.statistics(est, entry, x.reshape(-1, x.shape[-1]), basis_shape, refreshing=False)
    lifecycle.calibrate(entry, est, total, count, basis_shape, f"weight {name!r} (graph node {site!r})")


@torch.compiler.disable(reason="velora_fx counts training steps for refresh_every in Python; the compile backend "
                        "refreshes without a graph break")  # fmt: skip
def _advance(state: ProjectionState, name: str, x: torch.Tensor) -> None:
    """Count a training step of ``name``'s projection; refresh it (from ``x``, or by re-seeding) when one is due."""
    entry, est = state.get(name), for_config(state.config)
    index = lifecycle.begin_step(entry, est)
    if index is not None:
        x2d = x.reshape(-1, x.shape[-1])
        total, count = lifecycle.statistics(est, entry, x2d, _basis_shape(state, name), refreshing=True)
        lifecycle.refresh(entry, est, index, total, count)


def project(state: ProjectionState, x: torch.Tensor, weight: torch.Tensor, *, name: str, site: str) -> Optional[tuple]:
    """What the codec keeps of the input ``x`` of the weights sharing ``name``'s state (``encode``: ``(p,)`` for a
    projection), or ``None`` when nothing is to be kept."""
    forced = _forced_calibration
    if not (x.is_floating_point() and x.numel() > 0 and weight.requires_grad):
        return None
    if not (torch.is_grad_enabled() or forced):
        return None
    cfg = state.config
    if x.numel() * x.element_size() < cfg.min_saved_bytes:
        return None
    entry, est = state.get(name), for_config(cfg)
    if est.refresh_every and not forced:
        _advance(state, name, x)
    if not entry.calibrated:
        _calibrate(state, name, x, site)
    basis = entry.basis
    if est.refreshed_in_graph and not forced:  # VeLoRA's batch_average / ema: this step's v, from this batch
        with torch.no_grad():
            init = cfg.estimator.init
            basis = ops.refreshed_direction(basis, x, cfg.estimator.ema_decay if init == "ema" else None)
        entry.set_basis(basis)
    if not torch.is_grad_enabled():
        return None  # a calibration-only call
    with torch.no_grad():
        return est.encode(x.detach().to(ops.compute_dtype(x)), entry.basis, _basis_shape(state, name))


def _weight_grad_of(est, basis_shape):
    """``weight_grad(g, saved, state, features)`` of the codec, for ``VeloraLinearFunction``'s backward."""
    return functools.partial(_weight_grad_with, est, basis_shape)


def _weight_grad_with(est, basis_shape, g, saved, state, features):
    return est.weight_grad(g, saved, state, basis_shape, features)


def linear(state: ProjectionState, x: torch.Tensor, p: Optional[torch.Tensor], weight: torch.Tensor,
           bias: Optional[torch.Tensor], *, name: str, site: str, weight_is_out_by_in: bool) -> torch.Tensor:  # fmt: skip
    """One site: the plain op, keeping ``p`` instead of ``x`` for ``dW`` when ``p`` is given."""
    training = torch.is_grad_enabled() and weight.requires_grad and x.is_floating_point() and x.numel() > 0
    record = (training or _forced_calibration) and site not in state.fx_inputs and not torch.compiler.is_compiling()
    if not (record or (p is not None and training)):
        return _plain(x, weight, bias, weight_is_out_by_in)
    basis_shape = _basis_shape(state, name)
    if record:
        kept = x.numel() * x.element_size() >= state.config.min_saved_bytes
        state.fx_inputs[site] = (tuple(x.shape), ops.compute_dtype(x), basis_shape, kept)
    if p is None or not training:
        return _plain(x, weight, bias, weight_is_out_by_in)
    weight_grad = _weight_grad_of(for_config(state.config), basis_shape)
    return ops.VeloraLinearFunction.apply(x, p, weight, bias, state.get(name).basis, state.config.scale,
                                          weight_is_out_by_in, weight_grad)  # fmt: skip


def transform(gm: fx.GraphModule, config: Optional[VeloraConfig] = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that training it keeps only projections for ``dW``.

    Every ``nn.Linear``, ``F.linear`` and ``x @ W`` / ``x @ W.t()`` of a
    trainable 2-D parameter becomes a call of ``velora_fx.fx.linear``, and
    each input they read one ``velora_fx.fx.project``. The projections live in
    ``gm.velora_fx`` (``velora_fx.prepare``), so ``gm.state_dict()`` carries
    them as ``velora_fx.<weight>.v``, as for the compile backend. Everything
    else, and every site the config rules out, stays exact;
    ``velora_fx.report(gm)`` lists each decision. The first training forward
    calibrates every projection not calibrated yet (or call
    ``velora_fx.calibrate``). Transforming twice changes nothing the second time.

    Args:
        gm: a GraphModule at the ``torch.nn`` level, e.g. ``torch.fx.symbolic_trace(model)``.
        config: a ``VeloraConfig``; default ``VeloraConfig()`` (32 groups).

    Returns:
        ``gm`` itself, rewritten.

    Example::

        >>> gm = velora_fx.transform(torch.fx.symbolic_trace(model), VeloraConfig(num_groups=16))  # doctest: +SKIP
        >>> loss = gm(batch).sum(); loss.backward()                                             # doctest: +SKIP
        >>> print(velora_fx.report(gm))                                                          # doctest: +SKIP
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"velora_fx.transform takes a torch.fx.GraphModule, got {type(gm).__name__}; "
            "trace the model first (torch.fx.symbolic_trace(model)) or compile it with "
            "torch.compile(model, backend=velora_fx.backend)"
        )
    config = VeloraConfig() if config is None else config
    if not isinstance(config, VeloraConfig):
        raise TypeError(f"velora_fx.transform: config must be a VeloraConfig, got {type(config).__name__}")
    state = gm._modules.get(CONTAINER)
    if isinstance(state, ProjectionState) and state.config is not None and state.config != config:
        raise ValueError(
            f"velora_fx.transform: this GraphModule was already transformed with {state.config}; transforming it "
            f"again with {config} would mix two configs. Transform a fresh trace of the model instead."
        )
    prepare(gm).velora_fx.config = config  # what the ops of the rewritten graph read (scale, init, ...)
    linear_pass(gm, config)
    return gm


def linear_pass(gm: fx.GraphModule, config: VeloraConfig) -> PassResult:
    """``passes/fx_linear.py`` on a prepared ``gm`` with ``config``'s codec and this route's ops; idempotent."""
    codec = functools.partial(for_weight, config)
    return fx_linear.velora_linear_pass(gm, codec, config.why_excluded, _runtime(gm))


def _runtime(gm: fx.GraphModule) -> fx_linear.FxRuntime:
    """What ``gm``'s rewritten graph calls, and how its projections are bound (``lifecycle.bind``)."""

    def bind(weight: str, leader: str, features: int) -> None:
        state = _state_of(gm)
        codec = for_config(state.config)
        basis_shape = for_weight(state.config, leader).basis_shape(features)[0]
        how = {"route": "transform's", "fix": "transform with the config it was trained with"}
        lead = lifecycle.bind(gm.get_parameter(leader), leader, state, codec, basis_shape, features, **how)
        if weight != leader:
            lifecycle.bind(gm.get_parameter(weight), weight, state, codec, basis_shape, features, leader=lead, **how)

    return fx_linear.FxRuntime(state_attr=CONTAINER, project=project, linear=linear, bind=bind)


def _state_of(gm: fx.GraphModule) -> ProjectionState:
    found = gm._modules.get(CONTAINER)
    if not isinstance(found, ProjectionState):
        raise ValueError(f"velora_fx: {type(gm).__name__} has no {CONTAINER!r} state; velora_fx.prepare it first")
    return found


def records(obj: Any, inputs: Optional[dict[str, tuple]] = None) -> list[SiteRecord]:
    """The FX-route records of every transformed GraphModule in ``obj``, named as in ``obj``.

    ``inputs``: weight name -> (input shape, dtype name) seen by the compile backend, for a transformed GraphModule
    that ``torch.compile`` runs (its Python-side record of the inputs does not run inside a compiled graph).
    """
    if not isinstance(obj, nn.Module):
        return []
    out = []
    for path, module in obj.named_modules():
        if isinstance(module, fx.GraphModule) and isinstance(module._modules.get(CONTAINER), ProjectionState):
            prefix = f"{strip_compiled(path)}." if strip_compiled(path) else ""
            local = {w[len(prefix):]: v for w, v in (inputs or {}).items() if w.startswith(prefix)}
            out.extend(dataclasses.replace(r, weight=prefix + r.weight) for r in _records(module, local))
    return out


def _basis_shape(state: ProjectionState, name: str) -> tuple[int, ...]:
    """The basis shape of weight ``name``'s codec (a projection's ``(d, r)``): a traced codec's from the config (its state is only a key; the
    sizes may be the weight's own, ``VeloraConfig.overrides``), a projection's from its basis."""
    codec = for_weight(state.config, name)
    if codec.traced:
        return codec.basis_shape(0)[0]
    basis = state.get(name).basis
    return basis.shape[0], 1 if basis.dim() == 1 else basis.shape[1]


def _records(gm: fx.GraphModule, inputs: Optional[dict[str, tuple]] = None) -> list[SiteRecord]:
    """The decisions recorded in ``gm``'s graph, sized with the inputs seen so far.

    Sites that share one input (q/k/v projections of one normed tensor) count
    its bytes once, on the first of them, and its ``p`` once.
    """
    state = gm._modules.get(CONTAINER)
    state = state if isinstance(state, ProjectionState) else None
    seen = state.fx_inputs if state is not None else {}
    out = []
    first_user: dict[Any, str] = {}
    for node in gm.graph.nodes:
        record = node.meta.get(META_KEY, {}).get("record")
        if record is None:
            continue
        if record.status == COMPRESSED:
            changes: dict[str, Any] = {}
            info = seen.get(record.node)
            if info is None and state is not None and record.weight in (inputs or {}) and record.weight in state:
                shape, dtype = inputs[record.weight]  # seen by the compile backend: torch.compile runs this graph
                dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
                info = (shape, dtype, _basis_shape(state, record.weight), None)
            if info is not None:
                shape, dtype, basis_shape, kept = info
                before = input_bytes(shape, dtype)
                kept = before >= state.config.min_saved_bytes if kept is None else kept
                after = for_config(state.config).kept_bytes(shape, dtype, basis_shape)
                changes = {"input_shape": shape, "dtype": str(dtype).removeprefix("torch."), "bytes_before": before,
                           "bytes_after": after}  # fmt: skip
                if not kept:
                    changes.update(status=SKIPPED, bytes_after=before, reason=f"below min_saved_bytes ({before} bytes)")
                elif node.args[1] in first_user:
                    changes.update(bytes_before=0)  # counted on the first site reading the input
                    if node.args[2].kwargs["site"] != record.node:  # p counted on the site that computed it
                        changes["bytes_after"] = 0
                first_user.setdefault(node.args[1], record.node)
            if state is not None and record.weight in state:
                changes["last_refresh"] = state.get(record.weight).last_refresh
            record = dataclasses.replace(record, **changes)
        out.append(record)
    return out
