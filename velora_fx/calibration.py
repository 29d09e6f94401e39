"""``velora_fx.calibrate``: the FX route's projections calibrated explicitly, from one batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fx import calibrating, records
from .report import Report, report

__all__ = ["calibrate"]


def calibrate(module: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> Report:
    """Calibrate every uncalibrated projection of a transformed ``module`` from one batch, explicitly.

    Runs one forward under ``torch.no_grad()`` (nothing is kept for backward)
    with the RNG state restored afterwards, so that calibrating does not
    change the random stream of training. Already-calibrated projections (e.g.
    loaded from a checkpoint) are left alone.

    Returns:
        ``velora_fx.report(module)``.

    Example::

        >>> gm = velora_fx.transform(torch.fx.symbolic_trace(model))  # doctest: +SKIP
        >>> velora_fx.calibrate(gm, first_batch)                       # doctest: +SKIP
        >>> compiled = torch.compile(gm, fullgraph=True)               # doctest: +SKIP
    """
    if not records(module):
        raise ValueError(
            f"velora_fx.calibrate: {type(module).__name__} has no site rewritten by velora_fx.transform; "
            "run velora_fx.transform on it first (or nothing in it was compressed: see velora_fx.report)"
        )
    with torch.random.fork_rng(devices=[]), torch.no_grad(), calibrating():
        module(*example_inputs, **example_kwargs)
    return report(module)
