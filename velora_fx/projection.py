"""``Projection``: the state velora_fx keeps for one compressed weight (NOTE [the state model] in ``state.py``)."""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch

__all__ = ["CONTAINER", "STATE_DTYPE", "Projection"]

log = logging.getLogger(__name__)

#: The attribute ``prepare`` attaches, and the prefix of every state key.
CONTAINER = "velora_fx"

#: The dtype of every state tensor, whatever the model is cast to.
STATE_DTYPE = torch.float32


class Projection:
    """The projection state of one weight: its basis, whether it is calibrated, and its refresh step.

    ``basis`` is float32: VeLoRA's unit vector ``v`` of shape ``(d,)``, or a
    ``(d, r)`` basis. All zeros means "not calibrated yet". Weights that read
    one input share the projection of the first of them (NOTE [one basis per
    input] in ``velora_fx/runtime.py``): ``leader`` is then that weight's
    projection, and ``basis`` / ``step`` are the leader's.
    """

    def __init__(self, weight: str, field: str, basis: torch.Tensor, step: Union[None, int, torch.Tensor] = None):
        self.weight = weight
        self.field = field  # "v" (VeLoRA) or "basis"
        self._basis = basis
        # The one step counter: training steps seen (NOTE [one step is one optimizer step] in steps.py), a Python
        # int (no device sync per step). ``_scheduled``: a run with a schedule, whose counter state_dict() saves.
        self._steps = 0 if step is None else int(step)
        self._scheduled = step is not None
        self._last_refresh: Optional[int] = None  # the step of the last refresh this process made
        self.leader: Optional[Projection] = None
        self._calibrated = bool(basis.ne(0).any())
        #: the estimator that made the basis, where the field does not say (``"basis"``: random, principal and
        #: principal_random); ``None`` for a basis loaded from a checkpoint that did not record it
        self.estimator: Optional[str] = None
        # NOTE [one step is one optimizer step]: set by the optimizer hook (``_on_optimizer_step``)
        self._optimized = False  # an optimizer steps this weight: count its steps, not the calls of its graphs
        self._stepped = False  # it stepped since the last count
        self._mark: Optional[int] = None  # per-call counting: the count before the first call since creation/load

    def __repr__(self) -> str:
        shared = f", shares {self.leader.weight}" if self.leader is not None else ""
        return f"Projection({self.weight}, {self.field}={tuple(self.basis.shape)}, calibrated={self.calibrated}{shared})"

    @property
    def root(self) -> Projection:
        return self if self.leader is None else self.leader.root

    @property
    def basis(self) -> torch.Tensor:
        return self.root._basis

    @property
    def calibrated(self) -> bool:
        """Whether the basis (the leader's, for a weight sharing it) has been set from data, a seed or a checkpoint."""
        return self.root._calibrated

    @property
    def step(self) -> Optional[torch.Tensor]:
        """The step counter as ``state_dict()`` saves it (an int64 scalar on the basis's device), ``None`` without a
        schedule."""
        root = self.root
        return torch.tensor(root._steps, dtype=torch.int64, device=root._basis.device) if root._scheduled else None

    @property
    def steps(self) -> int:
        """Training steps counted for the refresh schedule (the leader's, for a weight sharing its basis)."""
        return self.root._steps

    @property
    def last_refresh(self) -> Optional[int]:
        """The step at which this process last refreshed the basis (``None``: never)."""
        return self.root._last_refresh

    @property
    def v(self) -> torch.Tensor:
        """VeLoRA's direction (the basis of shape ``(d,)``)."""
        return self.basis

    def set_basis(self, value: torch.Tensor) -> None:
        """Take a new basis (calibration, refresh) as a new tensor: a backward still pending from an earlier step
        keeps the basis its forward projected with."""
        root = self.root
        new = value.detach().to(root._basis.device, STATE_DTYPE).contiguous()  # the layout graphs were built for
        root._basis = new.clone() if new is value else new
        root._calibrated = True

    def tick(self, every: int) -> Optional[int]:
        """One training call of a graph that reads this projection: a step (``advance``) if it is the first call
        since the optimizer stepped the weight, else nothing. See NOTE [one step is one optimizer step]."""
        root = self.root
        if root._optimized:
            if not root._stepped:
                return None  # the same step: another micro-batch, another graph, an eval forward with grad
            root._stepped = False
        elif root._mark is None:
            root._mark = root._steps
        return self.advance(every)

    def optimizer_stepped(self) -> None:
        root = self.root
        if not root._optimized and root._mark is not None:  # the calls of the first step count as one
            root._steps = root._mark + 1
        root._optimized, root._stepped, root._mark = True, True, None

    def advance(self, every: int) -> Optional[int]:
        """Count one training step; the refresh index (1, 2, ...) when this step starts with a refresh, else None."""
        root = self.root
        due = every > 0 and root._steps > 0 and root._steps % every == 0
        root._steps += 1
        root._scheduled = root._scheduled or every > 0  # loaded from a run without a schedule: save it from here on
        if due:
            root._last_refresh = root._steps - 1
            return (root._steps - 1) // every
        return None

    def graph_input(self, device: torch.device) -> torch.Tensor:
        """The basis as a compiled graph expects it: float32 on ``device`` (moved there for good if it is not)."""
        root = self.root
        if root._basis.device.type == "meta":  # made on the meta device (a model built there): start afresh
            root._basis = torch.zeros(root._basis.shape, dtype=STATE_DTYPE, device=device)
            root._steps, root._calibrated = 0, False
        elif root._basis.device != device:
            root._basis = root._basis.to(device)
        return root._basis

    def share(self, leader: Projection) -> None:
        """Use ``leader``'s state from now on (warn if this weight's own, loaded state differed)."""
        if leader.root is self.root:
            return
        mine, theirs = self._basis, leader.basis
        if self._calibrated and (mine.shape != theirs.shape or not torch.equal(mine.to(theirs.device), theirs)):
            log.warning(
                "velora_fx: the projection of %s differs from that of %s, whose input it shares; both weights use "
                "the latter (one basis per input)",
                self.weight,
                leader.weight,
            )
        self.leader = leader.root

    def _apply_device(self, device: torch.device) -> None:
        self._basis = self._basis.to(device)
