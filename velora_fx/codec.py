"""The estimator interface: what a compressed input keeps in forward, and how backward forms ``dW`` from it.

An estimator is a codec with state. Per weight it declares the shape of its
state (a basis, a direction, a key: one float32 tensor, fed to the compiled
graph as an input and kept in ``model.state_dict()``), how that state starts,
calibrates from data and refreshes every ``refresh_every`` steps (the
lifecycle, ``lifecycle.py``, calls these for both routes), and the codec
proper, written twice over the same maths:

* eagerly, for the FX route (``ops.VeloraLinearFunction``): ``encode(x,
  state) -> saved tensors`` in forward, ``weight_grad(g, saved, state) -> dW``
  in backward (by default the exact matmul on ``decode(saved, state) -> x̂``);
* in a joint graph, for the compile route (``passes/joint_rewrite.py``):
  ``emit_encode`` before the first site, ``emit_weight_grad`` for a weight
  gradient the codec can form itself (``None``: the pass rebuilds ``x̂`` with
  ``emit_decode`` and keeps the weight-gradient op). By default these trace
  the eager methods (``GraphWriter.shared``), so a codec written as plain
  tensor code (the quantized estimator) is written once: each distinct
  ``encode`` / ``decode`` (per site settings and input size) is traced once
  into a subgraph that every input of that kind calls, and Inductor generates
  its kernels once per compiled graph rather than once per input (a bfloat16
  input's encode is inlined: NOTE [a shared encode is never recomputed]).

The projections (VeLoRA, random, principal, principal_random:
``estimators.ProjectionCodec``) keep ``p = x_sub B`` and form ``dW = (gᵀ p) Bᵀ``;
their graph code is ``projection_graph.py`` (matmuls, ``G p`` first). The
passes call only this interface and know no basis.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .config import VeloraConfig

__all__ = ["Estimator"]


class Estimator:
    """The interface (``Codec`` in the passes). Subclasses: ``estimators.ProjectionCodec``, ``QuantizedCodec``."""

    #: the state's field in ``state_dict()`` (``velora_fx.<weight>.<field>``)
    field = "basis"

    #: modules besides the classes' own whose code the codec writes into graphs (a compile-cache key covers them)
    source_modules: tuple[str, ...] = ()

    #: whether the codec keeps codes (the report counts bits per element) rather than coordinates in a basis
    #: (scalars per token, with a sub-token size)
    traced = False

    def __init__(self, config: VeloraConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.estimator_name

    @property
    def refresh_every(self) -> int:
        return self.config.estimator.refresh_every

    @property
    def refreshed_in_graph(self) -> bool:
        """Whether the graph computes this step's state itself (and returns it as an extra output)."""
        return False

    @property
    def shares_per_input(self) -> bool:
        """Whether weights reading one input use one state (NOTE [one basis per input] in ``runtime.py``)."""
        return True

    @property
    def refresh_needs_data(self) -> bool:
        """Whether a refresh reads the current batch (else it only re-seeds)."""
        return False

    # -- the state and its lifecycle -------------------------------------------------------------------

    def basis_shape(self, features: int) -> tuple[Optional[tuple[int, int]], str]:
        """``((d, r), "")`` for an input of ``features``, or ``(None, reason)`` when it cannot be compressed.

        Everything a site's sizes decide (``EstimatorSettings.SITE_FIELDS``) must be read back from this shape,
        never from the settings: the passes ask a weight's own codec (``VeloraConfig.for_weight``) for it and
        hand it to one codec, the estimator's, for everything else."""
        raise NotImplementedError

    def state_shape(self, basis_shape: tuple[int, int]) -> tuple[int, ...]:
        return tuple(basis_shape)

    def initial(self, basis_shape, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The state of a new projection (CPU; all zeros: to calibrate) and its step counter."""
        return torch.zeros(self.state_shape(basis_shape)), self._step()

    def _step(self) -> Optional[torch.Tensor]:
        return torch.zeros((), dtype=torch.int64) if self.refresh_every else None

    def statistics(self, x: torch.Tensor, basis_shape) -> tuple[torch.Tensor, int]:
        """What calibration needs from a batch ``x`` of shape ``(N, D)``: a sum (float64) and a count, additive."""
        raise NotImplementedError

    def calibrated(self, total: torch.Tensor, count: int, name: str, basis_shape) -> Optional[torch.Tensor]:
        """The state from summed statistics (``None``: no tokens, stay uncalibrated). Raises on NaN/inf."""
        raise NotImplementedError

    def refresh_statistics(self, x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What a refresh needs from the batch ``x`` of shape ``(N, D)``, given the current state; additive."""
        return self.statistics(x, tuple(basis.shape))

    def refreshed(self, basis: torch.Tensor, total: Optional[torch.Tensor], count: int, name: str, index: int) -> torch.Tensor:
        """The state after refresh number ``index`` (1, 2, ...), from the current one and, if it needs data, the
        refresh statistics of this batch (``count == 0``: none, keep what data gave before). A refresh that needs no
        data reads only ``basis.shape`` (the state may be on any device; the result is on the CPU)."""
        raise NotImplementedError

    # -- the codec, eagerly (the FX route) -------------------------------------------------------------

    def encode(self, x: torch.Tensor, state: torch.Tensor, basis_shape) -> tuple[torch.Tensor, ...]:
        """What forward keeps of ``x`` (``(..., D)``, in the dtype the matmul runs in) for the weight gradient;
        every saved tensor's first dimension is the number of tokens. Plain tensor code, traceable."""
        raise NotImplementedError

    def decode(self, saved: Sequence[torch.Tensor], state: torch.Tensor, basis_shape, features: int,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """``x̂`` of shape ``(N, features)`` in ``dtype`` from ``encode``'s output; traceable."""
        raise NotImplementedError

    def weight_grad(self, g: torch.Tensor, saved: Sequence[torch.Tensor], state: torch.Tensor, basis_shape,
                    features: int) -> torch.Tensor:  # fmt: skip
        """``gᵀ x̂`` of shape ``(out, features)`` from ``g`` ``(N, out)`` (unscaled): the exact matmul on ``x̂``."""
        return g.t().mm(self.decode(saved, state, basis_shape, features, g.dtype))

    # NOTE [a shared encode is never recomputed]
    # A ``GraphWriter.shared`` call is a higher-order op, which the min-cut partitioner never recomputes: the encode
    # runs in forward and its codes are saved. For a float32 input that is what the partitioner chooses anyway (the
    # same bytes at 2 and at 4 bits on `backend_bench.py`'s stack). For a bfloat16 / float16 input (autocast) it
    # may instead recompute the encode in backward from values backward keeps anyway (the float32 values autocast
    # cast from, the gate and up outputs SiLU's backward reads) and keep no codes at all: there the encode is
    # inlined. As a call, a 2-block LLaMA under CPU bf16 autocast kept 5 % more bytes (2 bits;
    # `benchmarks/README.md`, "Compile time, bf78917").

    # -- the codec in a joint graph (the compile route): ``w`` is a ``passes.graph_writer.GraphWriter`` ----------

    def emit_encode(self, w: Any, x: torch.fx.Node, state: torch.fx.Node, basis_shape) -> tuple[torch.fx.Node, ...]:
        """``encode`` of the stored input ``x``, written before the first forward site."""
        encode = lambda x, s: self.encode(x, s, basis_shape)  # noqa: E731
        if x.meta["val"].dtype.itemsize < 4:  # NOTE [a shared encode is never recomputed]
            return tuple(w.trace(encode, [x, state]))
        return tuple(w.shared(encode, [x, state], (self, "encode", basis_shape)))

    def emit_weight_grad(self, w: Any, g: torch.fx.Node, rows: Any, saved: Sequence[torch.fx.Node],
                         state: torch.fx.Node, basis_shape, features: int, scale: float) -> Optional[torch.fx.Node]:  # fmt: skip
        """``scale · gᵀ x̂`` of shape ``(out, features)`` from ``g`` ``(out, N)``, written before the weight-gradient
        op it replaces (``rows``: ``N`` as that op spells it, where the saved tensors spell it differently); or
        ``None`` to let that op read ``emit_decode``'s ``x̂``."""
        return None

    def emit_decode(self, w: Any, x: torch.fx.Node, saved: Sequence[torch.fx.Node], state: torch.fx.Node, basis_shape,
                    scale: float) -> torch.fx.Node:  # fmt: skip
        """``scale · x̂`` in the shape and dtype of ``x``, written before the weight-gradient op that reads it."""
        value = x.meta["val"]
        features, dtype = int(value.shape[-1]), value.dtype
        rows = w.shared(lambda s, *saved: self.decode(saved, s, basis_shape, features, dtype), [state, *saved],
                        (self, "decode", basis_shape, features, dtype), backward=True)
        return w(torch.ops.aten.view.default, w.scaled(rows, scale), [*w.dims(x, value.dim() - 1), features])

    # -- what the report says --------------------------------------------------------------------------

    def kept_bytes(self, shape: Sequence[int], dtype: torch.dtype, basis_shape) -> int:
        """Bytes forward keeps for an input of ``shape`` and ``dtype``."""
        raise NotImplementedError

    def per_token(self, features: int, basis_shape) -> float:
        """Scalars kept per token, or bits per element for a codec that keeps codes: what the report prints."""
        raise NotImplementedError

    def describe(self, basis_shape) -> Optional[str]:
        """What the report says of a site's own settings beyond ``per_token`` (``None``: nothing), in words: the
        report groups compressed sites by it, so that a per-weight override shows."""
        return None
