"""How each weight-gradient estimator sizes, initialises and calibrates its basis, for both routes.

An estimator keeps, per token of a compressed input, the coordinates ``p`` of
its sub-tokens in a basis ``B`` of shape ``(d, r)`` (NOTE [VeLoRA weight
gradient] in ``ops.py``). This module answers, for one weight: which ``(d, r)``
(or why the weight cannot be compressed), what state it keeps, what the
state starts as, and how a first batch calibrates it. Calibration goes
through *statistics* that add up over batches and over ranks (one
``all_reduce`` under ``torch.distributed``), so every rank ends with the same
basis.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .config import VeloraConfig

__all__ = ["Estimator", "for_config"]


class Estimator:
    """VeLoRA (the paper's, the default): one unit direction ``v`` per weight, ``d = ceil(D / num_groups)``, ``r = 1``.

    State: ``v`` of shape ``(d,)``. ``init`` chooses it: the normalised mean
    sub-token of the first batch (``batch_average_once``; refreshed every step
    by ``batch_average`` / ``ema``, inside the compiled graph), or a seeded
    random direction (``random``, calibrated from the start).
    """

    field = "v"

    def __init__(self, config: VeloraConfig):
        self.config = config

    def basis_shape(self, features: int) -> tuple[Optional[tuple[int, int]], str]:
        """``((d, r), "")`` for an input of ``features``, or ``(None, reason)`` when it cannot be compressed."""
        reason = self.config.why_not_splittable(features)
        if reason:
            return None, reason
        return (self.config.sub_token_size_for(features), 1), ""

    def state_shape(self, basis_shape: tuple[int, int]) -> tuple[int, ...]:
        return (basis_shape[0],)

    @property
    def refreshed_in_graph(self) -> bool:
        """Whether the graph computes this step's basis itself (and returns it as an extra output)."""
        return self.config.init in ("batch_average", "ema")

    @property
    def shares_per_input(self) -> bool:
        """Whether weights reading one input use one basis (NOTE [one basis per input] in ``runtime.py``)."""
        return self.config.init != "random"

    def initial(self, basis_shape: tuple[int, int], name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The state of a new projection (float32, CPU): the basis (all zeros: to calibrate) and the step counter."""
        d = basis_shape[0]
        if self.config.init == "random":
            return ops.random_direction(d, self.config.seed, name), None
        return torch.zeros(d, dtype=torch.float32), None

    def statistics(self, x: torch.Tensor, basis_shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """What calibration needs from a batch ``x`` of shape ``(N, D)``: a sum (float64) and a count, additive."""
        d = basis_shape[0]
        count = x.shape[0] * (-(-x.shape[-1] // d))
        return ops.sub_token_mean(x, d).double() * count, count

    def calibrated(self, total: torch.Tensor, count: int, name: str) -> Optional[torch.Tensor]:
        """The basis from summed statistics (``None``: no tokens, stay uncalibrated). Raises on NaN/inf."""
        if count == 0:
            return None
        return ops.direction_from_mean((total / count).float(), name)


def for_config(config: VeloraConfig) -> Estimator:
    """The estimator a config asks for."""
    return Estimator(config)
