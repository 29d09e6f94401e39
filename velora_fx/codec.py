"""The estimator interface: what a compressed input keeps in forward, and how backward forms ``dW`` from it.

An estimator is a codec with state. Per weight it declares the shape of its
state (a basis, a direction, a key: one float32 tensor, fed to the compiled
graph as an input and kept in ``model.state_dict()``), how that state starts,
calibrates from data and refreshes every ``refresh_every`` steps, and what
forward keeps of an input ``x`` of shape ``(N, D)``:

* a *projection* (VeLoRA, random, principal, principal_random) keeps
  ``p = x_sub B`` and forms ``dW = (gᵀ p) Bᵀ`` (NOTE [VeLoRA weight gradient]
  in ``ops.py``); the joint-graph pass builds those two matmuls itself;
* a *traced* codec (``traced = True``: the quantized estimator) gives
  ``encode(x, state) -> saved tensors`` and ``decode(saved, state, D, dtype)
  -> x̂`` as plain tensor code: the FX route runs it in an
  ``autograd.Function``, the compile backend traces it into the joint graph,
  and ``dW = scale · gᵀ x̂`` is the exact weight-gradient matmul on ``x̂``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import VeloraConfig

__all__ = ["Estimator"]


class Estimator:
    """The interface; ``Velora`` is the paper's estimator, the others project whole tokens (``d = D``)."""

    field = "basis"

    def __init__(self, config: VeloraConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.estimator_name

    @property
    def refresh_every(self) -> int:
        return self.config.refresh_every

    @property
    def refreshed_in_graph(self) -> bool:
        """Whether the graph computes this step's basis itself (and returns it as an extra output)."""
        return False

    @property
    def shares_per_input(self) -> bool:
        """Whether weights reading one input use one basis (NOTE [one basis per input] in ``runtime.py``)."""
        return True

    @property
    def refresh_needs_data(self) -> bool:
        """Whether a refresh reads the current batch (else it only re-seeds)."""
        return False

    def basis_shape(self, features: int) -> tuple[Optional[tuple[int, int]], str]:
        """``((d, r), "")`` for an input of ``features``, or ``(None, reason)`` when it cannot be compressed."""
        k = self.config.rank
        if k >= features:
            return None, (f"feature size {features} is not larger than rank {k}: the projection would keep as much "
                          "as the input; use a smaller rank (or exclude this weight) to compress it")  # fmt: skip
        return (features, k), ""

    def state_shape(self, basis_shape: tuple[int, int]) -> tuple[int, ...]:
        return tuple(basis_shape)

    def initial(self, basis_shape, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The state of a new projection (CPU): the basis (all zeros: to calibrate) and the step counter."""
        return torch.zeros(self.state_shape(basis_shape)), self._step()

    def _step(self) -> Optional[torch.Tensor]:
        return torch.zeros((), dtype=torch.int64) if self.refresh_every else None

    def statistics(self, x: torch.Tensor, basis_shape) -> tuple[torch.Tensor, int]:
        """What calibration needs from a batch ``x`` of shape ``(N, D)``: a sum (float64) and a count, additive."""
        x64 = x.detach().double()
        return x64.t() @ x64, x.shape[0]

    def calibrated(self, total: torch.Tensor, count: int, name: str, basis_shape) -> Optional[torch.Tensor]:
        """The basis from summed statistics (``None``: no tokens, stay uncalibrated). Raises on NaN/inf."""
        raise NotImplementedError

    def refresh_statistics(self, x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What a refresh needs from the batch ``x`` of shape ``(N, D)``, given the current basis; additive."""
        return self.statistics(x, tuple(basis.shape))

    def refreshed(self, basis: torch.Tensor, total: Optional[torch.Tensor], count: int, name: str, index: int) -> torch.Tensor:
        """The basis after refresh number ``index`` (1, 2, ...), from the current one and, if it needs data, the
        refresh statistics of this batch (``count == 0``: none, keep what data gave before). A refresh that needs no
        data reads only ``basis.shape`` (the basis may be on any device; the result is on the CPU)."""
        raise NotImplementedError

    # -- the codec: what forward keeps (traced codecs only) ----------------------------------------------

    #: whether ``encode`` / ``decode`` are traced into the graph (else the pass builds the projection matmuls)
    traced = False

    def encode(self, x: torch.Tensor, state: torch.Tensor, basis_shape) -> tuple[torch.Tensor, ...]:
        """What forward keeps of ``x`` (``(..., D)``) for the weight gradient; plain tensor code, traceable."""
        raise NotImplementedError

    def decode(self, saved: Sequence[torch.Tensor], state: torch.Tensor, basis_shape, features: int,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """``x̂`` of shape ``(N, features)`` in ``dtype`` from ``encode``'s output; traceable."""
        raise NotImplementedError

    def kept_bytes(self, shape: Sequence[int], dtype: torch.dtype, basis_shape) -> int:
        """Bytes forward keeps for an input of ``shape`` and ``dtype``: ``p`` (``N · n · r`` elements of ``dtype``)."""
        d, r = basis_shape
        features = int(shape[-1]) if len(shape) else 1
        numel = 1
        for s in shape:
            numel *= int(s)
        tokens = numel // features if features else 0
        return tokens * (-(-features // d)) * r * torch.empty((), dtype=dtype).element_size()

    def per_token(self, features: int, basis_shape) -> float:
        """Scalars (projections) kept per token, or bits per element for a quantized codec: what the report prints."""
        d, r = basis_shape
        return -(-features // d) * r
