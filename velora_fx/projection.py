"""``VeloraProjection``: the per-weight state of the FX route (``v``) and the op each rewritten site calls."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import VeloraConfig
from .report import kept_bytes

__all__ = ["VeloraProjection"]

log = logging.getLogger(__name__)

# Set by ``calibrating()``: sites calibrate their ``v`` even outside a training step.
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


class VeloraProjection(nn.Module):
    """The projection direction ``v`` of one weight, and the linear op of that weight's sites.

    ``v`` is a persistent float32 buffer (all zeros until calibrated), so
    ``state_dict()`` carries it and a resumed run is identical.
    ``calibrated`` mirrors "``v`` is non-zero" as a plain Python flag that
    Dynamo can guard on (reading the buffer would be data-dependent); it is
    refreshed after ``load_state_dict``.

    A site's call is the plain op unless this is a training step (module in
    ``train()``, grad mode on, the weight requires grad) on a non-empty
    floating input of at least ``config.min_saved_bytes``.
    """

    def __init__(self, weight_name: str, features: int, sub_token_size: int, config: VeloraConfig):
        super().__init__()
        self.weight_name = weight_name
        self.features = features
        self.sub_token_size = sub_token_size
        self.config = config
        if config.init == "random":
            v = ops.random_direction(sub_token_size, config.seed, weight_name)
        else:
            v = torch.zeros(sub_token_size, dtype=torch.float32)
        self.register_buffer("v", v, persistent=True)
        self.calibrated = config.init == "random"
        # site name -> (input shape, dtype) of the first compressed call: what report() sizes.
        self.seen: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def extra_repr(self) -> str:
        return f"{self.weight_name}, features={self.features}, sub_token_size={self.sub_token_size}, init={self.config.init!r}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        v = state_dict.get(prefix + "v")
        if v is not None and v.shape != self.v.shape:
            return  # the parent reported the size mismatch; keep our flag as it was
        self.calibrated = bool(self.v.ne(0).any())

    # -- what runs at a site ----------------------------------------------------------

    def _is_training_call(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if not (x.is_floating_point() and weight.requires_grad and x.numel() > 0):
            return False
        return _forced_calibration or (self.training and torch.is_grad_enabled())

    @torch.compiler.disable(reason="velora_fx calibrates v eagerly on the first training batch; "
                            "call velora_fx.calibrate(model, batch) before compiling with fullgraph=True")
    def _calibrate(self, x: torch.Tensor, site: str) -> None:
        with torch.no_grad():
            self.v.copy_(ops.initial_direction(x, self.sub_token_size, f"weight {self.weight_name!r} (graph node {site!r})"))
        self.calibrated = True
        log.debug("velora_fx: calibrated v of %s from a %s input at %s", self.weight_name, tuple(x.shape), site)

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        site: str,
        weight_is_out_by_in: bool = True,
    ) -> torch.Tensor:
        if not self._is_training_call(x, weight):
            return F.linear(x, weight if weight_is_out_by_in else weight.t(), bias)
        if site not in self.seen and not torch.compiler.is_compiling():
            self.seen[site] = (tuple(x.shape), x.dtype)
        if x.numel() * x.element_size() < self.config.min_saved_bytes:
            return F.linear(x, weight if weight_is_out_by_in else weight.t(), bias)
        if not self.calibrated:
            self._calibrate(x, site)
        v = self.v
        if self.config.init in ("batch_average", "ema") and not _forced_calibration:
            decay = self.config.ema_decay if self.config.init == "ema" else None
            with torch.no_grad():
                v = ops.refreshed_direction(self.v, x, decay)
                self.v.copy_(v)
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, weight if weight_is_out_by_in else weight.t(), bias)  # calibration-only call
        return ops.velora_linear(x, weight, bias, v, self.config.scale, weight_is_out_by_in)

    def kept_bytes(self, site: str) -> tuple[Optional[tuple[int, ...]], Optional[str], Optional[int], Optional[int]]:
        """(shape, dtype, bytes kept without / with VeLoRA) of ``site``'s input, once it has run."""
        if site not in self.seen:
            return None, None, None, None
        shape, dtype = self.seen[site]
        before, after = kept_bytes(shape, dtype, self.sub_token_size)
        if before < self.config.min_saved_bytes:
            after = before
        return shape, str(dtype).removeprefix("torch."), before, after
