"""Rewrites of the Dynamo graph, before AOTAutograd traces it: the per-step directions of ``batch_average`` / ``ema``.

Under ``init="batch_average"`` / ``"ema"`` VeLoRA's direction ``v`` follows
the data: this step's ``v_t`` is computed from this step's input, before the
first matmul that uses it, marked with ``DIRECTION_OP`` (so the joint-graph
pass uses ``v_t`` instead of the ``v`` input), and returned as an extra graph
output, which the runtime writes back into the state. No recompilation: ``v``
is an input, ``v_t`` an output.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch.fx

from velora_fx.passes.contract import ParamSlot
from velora_fx.passes.direction_op import DIRECTION_OP

__all__ = ["insert_direction_refresh"]


def insert_direction_refresh(
    gm: torch.fx.GraphModule,
    slots: Sequence[ParamSlot],
    uses: dict[int, list[tuple[torch.fx.Node, torch.fx.Node]]],
    basis_inputs: dict[int, torch.fx.Node],
    refreshed_direction: Callable[..., torch.Tensor],
    ema_decay: Optional[float],
) -> int:
    """Compute, mark and return this step's direction of every basis input; returns how many outputs were added.

    Args:
        gm: the backend's copy of the Dynamo graph (with the basis inputs); changed in place.
        slots: the parameter slots; a slot with a ``basis_primal`` and no ``leader`` owns a basis input.
        uses: per slot primal, its ``(matmul, input)`` pairs in the original graph (matched here by name).
        basis_inputs: basis input position -> its placeholder in ``gm``.
        refreshed_direction: ``(v, x, ema_decay) -> v_t``, the function the graph calls (``ops.refreshed_direction``).
        ema_decay: ``None`` for ``batch_average``, the decay for ``ema``.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    extra = []
    for k, slot in enumerate(slots):
        if slot.basis_primal is None or slot.leader is not None:
            continue
        # before the first matmul of this weight and of the weights sharing its basis: they all read one input
        group = [uses[s.primal][0] for s in slots if s.primal == slot.primal or s.leader == k]
        first, inp = min(group, key=lambda u: order[u[0].name])
        with gm.graph.inserting_before(by_name[first.name]):
            v_t = gm.graph.call_function(refreshed_direction, (basis_inputs[slot.basis_primal], by_name[inp.name], ema_decay))
            extra.append(gm.graph.call_function(DIRECTION_OP, (v_t, slot.basis_primal)))
    output = gm.graph.output_node()
    outs = output.args[0]
    output.args = (tuple(outs) + tuple(extra),) if isinstance(outs, (tuple, list)) else ((outs, *extra),)
    gm.recompile()
    return len(extra)
