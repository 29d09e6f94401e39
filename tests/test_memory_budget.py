"""One memory knob (``VeloraConfig.memory_budget``) and what the report says was kept (``GraphSummary``).

* The summary is what autograd really keeps: the bytes ``saved_tensors_hooks`` see for the compiled graph.
* The budget is applied to velora_fx's compiles only, never left set globally, and is part of what a compiled
  graph is keyed on: two instances of one class under two budgets, no ``torch._dynamo.reset()``, keep the bytes of
  their own budget (a global flag changed between them would be ignored: Dynamo would reuse the first graph).
* Lower budgets keep fewer bytes and recompute more; VeLoRA under a budget keeps fewer bytes than the budget alone.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import velora_fx
from velora_fx import Velora, VeloraConfig
from velora_fx import _torch_internals as ti
from velora_fx.compile_backend import rewrite_options
from velora_fx.passes import joint_graph as jg
from velora_fx.passes.contract import GraphSpec

from .backend_models import LlamaStack
from .helpers import Run, kept_bytes, saved_bytes_step

BUDGETS = (None, 0.5, 0.2)


@pytest.fixture(scope="module")
def runs():
    """One LLaMA-like stack per budget, each a new instance of the same class, all in one Dynamo session."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = LlamaStack(blocks=2, dim=64, heads=4, hidden=96)
    x = torch.randn(2, 16, 64)
    out = {}
    with ti.compile_caches(False):
        for budget in BUDGETS:
            model = velora_fx.prepare(copy.deepcopy(base))
            compiled = torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8), memory_budget=budget)))
            kept_bytes(compiled, x)  # compile, calibrate
            flag_after = torch._functorch.config.activation_memory_budget
            out[budget] = Run(model=model, kept=kept_bytes(compiled, x), report=velora_fx.report(model), flag=flag_after)
        plain = torch.compile(copy.deepcopy(base))
        kept_bytes(plain, x)
        out["default"] = Run(kept=kept_bytes(plain, x))
    return out


def test_summary_is_what_autograd_keeps(runs):
    for budget in BUDGETS:
        (graph,) = runs[budget].report.graphs
        assert graph.saved_bytes == runs[budget].kept == runs[budget].report.saved_bytes, budget
        assert graph.memory_budget == budget and graph.instances == 1


def test_budget_is_scoped_and_keyed_per_backend(runs):
    assert all(runs[b].flag == 1.0 for b in BUDGETS)  # never left set
    kept = [runs[b].kept for b in BUDGETS]
    assert kept[0] > kept[1] > kept[2], kept  # each instance partitioned under its own budget
    recomputed = [runs[b].report.graphs[0].recomputed_ops for b in BUDGETS]
    assert recomputed[0] < recomputed[1] <= recomputed[2], recomputed


def test_velora_keeps_fewer_bytes_than_default_and_projections_are_counted(runs):
    assert runs[None].kept < runs["default"].kept
    (graph,) = runs[None].report.graphs
    assert graph.projections == 6 and graph.projection_bytes == 6 * 2 * 16 * 8 * 4  # one p (N x 8) per input
    text = str(runs[0.2].report)
    assert "memory budget 0.2" in text and "recomputes" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_budget_is_part_of_the_pass_uuid():
    spec = GraphSpec("g", 1, ())
    ids = {jg.VeloraJointPass(spec, rewrite_options(VeloraConfig(memory_budget=b))).uuid() for b in BUDGETS}
    assert len(ids) == len(BUDGETS)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "0.5", True])
def test_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match=r"memory_budget must be None or a number in \(0, 1\]"):
        VeloraConfig(memory_budget=bad)


def test_summary_survives_a_compile_cache_hit(tmp_path, monkeypatch):
    """Cold, a full hit (AOTAutograd's cache: no pass runs), and a partial one (AOTAutograd's cache lost, Inductor's
    FX graph cache hit: the joint pass runs, the partition summary does not)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(1)
    base = LlamaStack(blocks=1, dim=32, heads=2, hidden=48)
    x = torch.randn(2, 8, 32)
    summaries = []
    for lose_aot_cache in (False, False, True, False):
        if lose_aot_cache:
            shutil.rmtree(tmp_path / "aotautograd")
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=4), memory_budget=0.5))), x)
        summaries.append(velora_fx.report(model).graphs)
    assert summaries[0] and all(s == summaries[0] for s in summaries), summaries
