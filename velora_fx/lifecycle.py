"""The lifecycle of a projection, one definition for both routes: bind, count a step, calibrate, refresh.

The compile backend's runtime (``runtime.CompiledGraph``) and the FX route's
ops (``fx.project``) both go through these functions, in this order on every
training call of a compressed input:

1. ``bind``: the projection of the parameter, created from the codec's
   initial state when new (in the prepared model's state, or the side table
   of an unprepared one: NOTE [the state model] in ``state.py``), checked
   against the codec when it exists (loaded from a checkpoint), shared with
   the leader of its input (NOTE [one basis per input] in ``runtime.py``) and
   counted by the optimizer's steps of the parameter (``steps.py``). Once per
   parameter object.
2. ``begin_step``: count the step; a refresh that needs no data (a re-seed)
   happens here, one that needs the batch is returned to the caller.
3. ``calibrate`` / ``refresh`` from the batch's ``statistics`` (which the
   runtime first sums over ranks: NOTE [one basis on every rank]).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .checkpoint import check_estimator
from .codec import Estimator
from .projection import CONTAINER, Projection
from .state import ProjectionState, new_projection, projection_for
from .steps import watch_steps

__all__ = ["bind", "begin_step", "statistics", "calibrate", "refresh"]

log = logging.getLogger(__name__)


def bind(param: torch.Tensor, name: str, owner: Optional[ProjectionState], codec: Estimator, basis_shape,
         features: int, *, leader: Optional[Projection] = None, route: str = "backend's",
         fix: str = "compile with the config the model was trained with, or train a freshly prepared model") -> Projection:  # fmt: skip
    """The projection of ``param`` (named ``name`` in ``owner``; ``owner=None``: a model not prepared).

    New: the codec's initial state (a weight sharing ``leader``'s state starts from zeros: its own is never
    read). Existing: its shape and estimator must be the codec's, else a ``ValueError`` naming the state key,
    what ``route``'s config needs, and ``fix``.
    """
    shape = codec.state_shape(basis_shape)
    proj = projection_for(param, name, owner)
    if proj is None:
        state, step = codec.initial(basis_shape, name)
        if leader is not None:
            state = torch.zeros_like(state)
        proj = new_projection(param, name, owner, codec.field, state.to(param.device), step, codec.name)
    else:
        where = f"{CONTAINER}.{name}.{proj.field}" if owner is not None else "kept outside the state_dict"
        if proj.field != codec.field or tuple(proj._basis.shape) != shape:
            raise ValueError(
                f"velora_fx: the projection of {name} ({where}) has shape {tuple(proj._basis.shape)} but this "
                f"{route} config needs {shape} for D={features}; {fix}"
            )
        check_estimator(proj, codec.name, where)
    if leader is not None:
        proj.share(leader)
    watch_steps(param, proj.root)
    return proj


def begin_step(proj: Projection, codec: Estimator) -> Optional[int]:
    """Count one training call of ``proj`` (NOTE [one step is one optimizer step]); re-seed it when a refresh
    that needs no data is due. Returns the index of a due refresh that needs this batch (``refresh`` it from
    ``statistics``), else ``None``. An uncalibrated projection is not refreshed: it calibrates instead."""
    index = proj.tick(codec.refresh_every) if codec.refresh_every else None
    if index is None or not proj.calibrated:
        return None
    if codec.refresh_needs_data:
        return index
    proj.set_basis(codec.refreshed(proj.basis, None, 0, proj.weight, index))  # reads only the shape: no copy
    return None


def statistics(codec: Estimator, proj: Projection, x: torch.Tensor, basis_shape, refreshing: bool):
    """What ``calibrate`` (``refreshing=False``) or ``refresh`` needs from the inputs ``x`` (``(N, D)``)."""
    x = x.detach()
    return codec.refresh_statistics(x, proj.basis.to(x.device)) if refreshing else codec.statistics(x, basis_shape)


def calibrate(proj: Projection, codec: Estimator, total: torch.Tensor, count: int, basis_shape, label: str) -> None:
    """Set ``proj`` from summed calibration statistics (no tokens: it stays uncalibrated, its ``dW`` is 0)."""
    state = codec.calibrated(total, count, label, basis_shape)
    if state is not None:
        proj.set_basis(state)
        log.info("velora_fx: calibrated the projection of %s", label)


def refresh(proj: Projection, codec: Estimator, index: int, total: torch.Tensor, count: int) -> None:
    """Refresh number ``index`` of ``proj`` from this batch's summed refresh statistics."""
    proj.set_basis(codec.refreshed(proj.basis.cpu(), total.cpu(), count, proj.weight, index))
    log.debug("velora_fx: refreshed the projection of %s (refresh %d)", proj.weight, index)
