"""The FX route: ``transform`` a GraphModule and ``calibrate`` its projection directions."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx, nn

from velora_fx.passes import fx_linear

from .config import VeloraConfig
from .projection import VeloraProjection, calibrating
from .report import Report, attach_records, report

__all__ = ["transform", "calibrate"]


def transform(gm: fx.GraphModule, config: Optional[VeloraConfig] = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that training it keeps only VeLoRA projections for ``dW``.

    Every ``nn.Linear``, ``F.linear`` and ``x @ W`` / ``x @ W.t()`` of a
    trainable 2-D parameter becomes a call of a ``VeloraProjection`` (one per
    weight, under ``gm.velora_fx``; its ``v`` is a persistent buffer, so
    ``state_dict()`` carries it). Everything else, and every site the config
    rules out, stays exact; ``velora_fx.report(gm)`` lists each decision. The
    first training forward calibrates every ``v`` not calibrated yet (or call
    ``velora_fx.calibrate``); ``eval()`` / ``no_grad`` run the plain ops.
    Transforming twice changes nothing the second time.

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
    fx_linear.velora_linear_pass(gm, config)
    if not any(p is _fx_records for p in gm.__dict__.get("_velora_fx_records", [])):
        attach_records(gm, _fx_records.__get__(gm))
    return gm


def _fx_records(gm: fx.GraphModule):
    return fx_linear.records(gm)


def projections(module: nn.Module) -> dict[str, VeloraProjection]:
    """The ``VeloraProjection`` modules of ``module`` by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, VeloraProjection)}


def calibrate(module: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> Report:
    """Calibrate every uncalibrated ``v`` of a transformed ``module`` from one batch, explicitly.

    Runs one forward under ``torch.no_grad()`` (nothing is kept for backward)
    with the RNG state restored afterwards, so that calibrating does not
    change the random stream of training. Already-calibrated directions (e.g.
    loaded from a checkpoint) are left alone.

    Returns:
        ``velora_fx.report(module)``.

    Example::

        >>> gm = velora_fx.transform(torch.fx.symbolic_trace(model))  # doctest: +SKIP
        >>> velora_fx.calibrate(gm, first_batch)                       # doctest: +SKIP
        >>> compiled = torch.compile(gm, fullgraph=True)               # doctest: +SKIP
    """
    if not projections(module):
        raise ValueError(
            f"velora_fx.calibrate: {type(module).__name__} has no VeloraProjection; "
            "run velora_fx.transform on it first (or nothing in it was compressed: see velora_fx.report)"
        )
    with torch.random.fork_rng(devices=[]), torch.no_grad(), calibrating():
        module(*example_inputs, **example_kwargs)
    return report(module)
