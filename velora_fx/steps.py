"""Counting training steps: one step is one optimizer step of the weight.

NOTE [one step is one optimizer step]
A refresh schedule (``refresh_every``) and the quantized estimator's per-step draws count training steps. A step
is an optimizer step of the weight: a global optimizer step post-hook marks the projections of the parameters the
optimizer stepped, and the first graph call after the mark counts one step; further calls before the next mark
(micro-batches of gradient accumulation, the other graph of a weight used on both sides of a graph break, an eval
forward with grad) count nothing. Until an optimizer has stepped the weight (training without ``torch.optim``,
or parameters the optimizer holds as other objects, e.g. FSDP2's shards), each call counts; at the first optimizer
step the calls since creation or load are folded into one.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from .projection import Projection

__all__ = ["watch_steps"]

_PROJECTION_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> its projection, for the optimizer hook
_HOOK = None


def watch_steps(param: torch.Tensor, proj: Projection) -> None:
    """Count ``proj``'s steps by the optimizer steps of ``param`` (NOTE [one step is one optimizer step])."""
    global _HOOK
    _PROJECTION_OF[param] = proj
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_on_optimizer_step)


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _PROJECTION_OF:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            proj = _PROJECTION_OF.get(param)
            if proj is not None:
                proj.optimizer_stepped()
