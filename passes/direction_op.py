"""The marker op of a per-step direction (``init="batch_average"`` / ``"ema"``).

Under init="batch_average" / "ema" the backend computes ``v_t`` for this step
inside the Dynamo graph (passes/dynamo_graph.py) and wraps it in this op (also
returned as an extra output, so the runtime can write it into the state). The
pass finds the op by its ``slot`` argument (the position of the basis input it
replaces, shared by every weight using that basis), uses its input as the
basis of those weights' sites, and removes it. Should the pass not run or
fail, Inductor falls back to the eager kernel: a copy, still correct.

"""

from __future__ import annotations

import torch

__all__ = ["DIRECTION_OP"]


@torch.library.custom_op("velora_fx::direction", mutates_args=())
def _direction(v: torch.Tensor, slot: int) -> torch.Tensor:
    """Marks ``v`` as this step's value of the basis input at position ``slot`` (a copy)."""
    return v.clone()


@_direction.register_fake
def _(v: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(v)


DIRECTION_OP = torch.ops.velora_fx.direction.default
