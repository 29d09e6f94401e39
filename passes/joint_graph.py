"""The VeLoRA rewrite of a joint forward+backward aten graph, before the partitioner.

Plan, then apply (the invariants are in README.md beside this file):

* ``plan_joint_graph`` finds every *site* (an aten matmul in the forward
  whose weight operand traces back, through the weight chain of
  ``passes/sites.py``, to a trainable parameter input) and decides **per
  stored tensor** ``X`` (the left operand with its views peeled off) whether
  it can be compressed: only when every backward use of ``X`` is a
  weight-gradient matmul of a site that has a projection basis. The plan is
  data: one ``PlannedSite`` per site, with status, reason and bytes.
* ``apply_joint_plan`` inserts ``p = X B`` before the first forward site and
  serves every weight gradient from ``p``, so that the min-cut partitioner
  keeps ``p`` (or recomputes it) and drops ``X``.
* ``velora_joint_pass`` runs both, guarded: a failure leaves the graph as it
  was (exact) and is logged; it returns ``PassResult(graph, modified)``.

See NOTE [VeLoRA weight gradient] in ``velora_fx/ops.py`` for the math; the
numbers here are those of ``ops.project`` / ``ops.weight_grad`` up to float
re-association.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from velora_fx import _torch_internals as ti
from velora_fx import records
from velora_fx.passes import contract, direction_op, graph_writer, joint_plan, joint_rewrite, sites
from velora_fx.passes.contract import GraphSpec, RewriteOptions
from velora_fx.passes.direction_op import DIRECTION_OP
from velora_fx.passes.joint_plan import JointPlan, plan_joint_graph
from velora_fx.passes.joint_rewrite import apply_joint_plan

__all__ = ["JointPlan", "VeloraJointPass", "plan_joint_graph", "apply_joint_plan", "velora_joint_pass", "DIRECTION_OP"]

log = logging.getLogger(__name__)


# -- the pass ----------------------------------------------------------------------


def velora_joint_pass(graph: torch.fx.Graph, spec: GraphSpec, options: RewriteOptions) -> tuple[PassResult, JointPlan]:
    """Plan and apply the rewrite; a second run changes nothing. Guarded: on any error the graph is left as it
    was (exact: the direction markers, if any, are copies) and the error is logged.

    Returns ``PassResult(graph, modified)`` and the plan (empty after an error).
    """
    try:
        plan = plan_joint_graph(graph, spec, options)
    except Exception:  # planning changes nothing
        log.warning("velora_fx: planning %s failed; it stays exact", spec.name, exc_info=True)
        return PassResult(graph, False), JointPlan()
    snapshot = ti.snapshot_graph(graph)
    try:
        modified = apply_joint_plan(graph, plan, spec, options)
    except Exception:
        ti.restore_graph(graph, snapshot)
        log.warning("velora_fx: rewriting %s failed; it stays exact", spec.name, exc_info=True)
        return PassResult(graph, False), JointPlan()
    return PassResult(graph, modified), plan


#: what the rewrite and its plan depend on (with the options and the slots: see uuid): the pass's modules, the
#: contract, the site tables, the torch internals and the byte accounting; the codec adds its own sources (a codec's
#: code is inlined into the graph: editing it must miss the cache)
_SOURCES = tuple(sys.modules[m].__file__ for m in (__name__, joint_plan.__name__, joint_rewrite.__name__,
                                                   graph_writer.__name__, direction_op.__name__, contract.__name__,
                                                   sites.__name__, ti.__name__, records.__name__))


class VeloraJointPass(ti.CustomGraphPass):
    """``torch._inductor.config.joint_custom_pre_pass`` for one graph: ``velora_joint_pass``, plan kept in ``plan``.

    ``uuid()`` covers this file's source, the config and the graph's slots, so
    an Inductor / AOTAutograd cache hit never serves a graph rewritten
    differently (or not at all).
    """

    def __init__(self, spec: GraphSpec, options: RewriteOptions):
        self.spec, self.options = spec, options
        self.plan: Optional[JointPlan] = None
        self.modified = False

    def __call__(self, graph: torch.fx.Graph) -> None:
        result, self.plan = velora_joint_pass(graph, self.spec, self.options)
        self.modified = result.modified
        log.debug("velora_fx: %s planned %d sites, modified=%s", self.spec.name, len(self.plan.sites), self.modified)
        if self.modified and log.isEnabledFor(logging.DEBUG):
            log.debug("velora_fx: rewritten joint graph of %s:\n%s", self.spec.name, graph)

    def uuid(self) -> str:
        extra = json.dumps({"options": self.options.key, "spec": self.spec.key_dict()}, sort_keys=True)
        return ti.hash_files(_SOURCES + self.options.codec_sources(), extra)
