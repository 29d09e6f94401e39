"""velora_fx.backend: torch.compile(model, backend=velora_fx.backend).

Compiles are shared through module-scoped fixtures (each Inductor compile
costs seconds on a small CPU). Three things are compared:
the rewritten graphs, the numerics (against the default ``torch.compile`` of
a deep copy, against the VeLoRA formula from captured ``X`` / ``g``, and
against ``velora_fx.ops.velora_linear``), and the ``torch.compile`` path
itself (caches, dynamic shapes, recompiles, state_dict).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import velora_fx
from velora_fx import Velora, VeloraConfig, ops
from velora_fx import _torch_internals as ti
from velora_fx.compile_backend import rewrite_options
from velora_fx.passes import joint_graph as jg
from velora_fx.passes import joint_plan, joint_rewrite
from velora_fx.passes.contract import GraphSpec
from velora_fx.passes.sites import META_KEY
from velora_fx.report import COMPRESSED, SKIPPED
from velora_fx.runtime import CompiledGraph

from .backend_models import BrokenStack, LlamaStack, TiedLM, TinyMLP
from .helpers import (
    aot_cache_hits,
    generated_code,
    ATOL,
    RTOL,
    Run,
    assert_close,
    capture_linears,
    directions,
    grads,
    patched_with_velora_linear,
    saved_bytes_step,
    state_keys,
    velora_dw,
)


class Counting:
    """A backend that counts the graphs it compiles."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.__name__ = f"counting_{getattr(inner, '__name__', 'inductor')}"

    def __call__(self, gm, example_inputs, **kwargs):
        self.calls += 1
        self.last = self.inner(gm, example_inputs, **kwargs)
        return self.last


def _inductor(gm, example_inputs, **kwargs):
    return ti.compile_fx(gm, example_inputs, ti.mode_config_patches(kwargs.get("mode"), kwargs.get("options")))


def _records(plan: jg.JointPlan, spec: GraphSpec):
    """The plan's sites as public records, each weight named by its slot's name."""
    return [s.render(spec.name, [slot.name for slot in spec.slots]) for s in plan.sites]


# -- the LLaMA-like stack: one velora compile, one default compile ---------------------------

STACK_CFG = VeloraConfig(estimator=Velora(num_groups=7), scale=0.5)  # 7 divides neither 64 nor 96: padded sub-tokens


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    model = LlamaStack(blocks=2, dim=64, heads=4, hidden=96)
    initial = copy.deepcopy(model)
    default_model = copy.deepcopy(model)
    x = torch.randn(2, 16, 64)

    graphs = []
    original_call = jg.VeloraJointPass.__call__

    def recording_call(self, graph):
        before = copy.deepcopy(graph)
        original_call(self, graph)
        graphs.append(types.SimpleNamespace(before=before, after=graph, spec=self.spec, plan=self.plan))

    # static shapes whatever ran before: a test that compiled LlamaStack at another size would make Dynamo's
    # automatic dynamic shapes compile this one with symbolic sizes (the graphs the plan tests below read)
    with pytest.MonkeyPatch.context() as mp, ti.compile_caches(False):
        mp.setattr(jg.VeloraJointPass, "__call__", recording_call)
        compiled = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(STACK_CFG), fullgraph=True,
                                 dynamic=False)  # fmt: skip
        loss, nbytes = saved_bytes_step(compiled, x)
    default_loss, default_bytes = saved_bytes_step(torch.compile(default_model, fullgraph=True, dynamic=False), x)

    eager = copy.deepcopy(initial)
    seen, handles = capture_linears(eager)
    eager_loss, _ = saved_bytes_step(eager, x)
    for h in handles:
        h.remove()
    return Run(
        model=model, compiled=compiled, initial=initial, default_model=default_model, x=x, loss=loss,
        bytes=nbytes, default_loss=default_loss, default_bytes=default_bytes, seen=seen, eager_loss=eager_loss,
        graphs=graphs,
    )  # fmt: skip


def test_stack_loss_equals_default_compile(stack):
    assert_close(stack.loss, stack.default_loss, "loss")
    assert_close(stack.loss, stack.eager_loss, "loss vs eager")


def test_stack_report_compresses_all_but_o_proj(stack):
    rep = velora_fx.report(stack.model)
    assert rep == velora_fx.report(stack.compiled)
    assert len(rep) == 14  # 7 linears per block
    for r in rep:
        if r.weight.endswith("o_proj.weight"):
            assert r.status == SKIPPED, r
            assert "kept for backward anyway" in r.reason, r.reason
            assert r.bytes_after == r.bytes_before
        else:
            assert r.status == COMPRESSED, r
            assert r.sub_token_size == STACK_CFG.sub_token_size_for(r.input_shape[-1])
    # q/k/v share one input: its bytes are counted once
    q = [r for r in rep if r.weight.endswith("q_proj.weight")]
    k = [r for r in rep if r.weight.endswith("k_proj.weight")]
    assert all(r.bytes_before == 2 * 16 * 64 * 4 for r in q) and all(r.bytes_before == 0 for r in k)
    assert k[0].reason == q[0].reason == (
        "compressed; layers.0.self_attn.q_proj.weight, layers.0.self_attn.k_proj.weight, "
        "layers.0.self_attn.v_proj.weight read one input and keep one p (its bytes counted on the first)"
    )


def test_stack_exact_gradients_equal_default_compile(stack):
    compressed = {r.weight for r in velora_fx.report(stack.model).compressed}
    got, ref = grads(stack.model), grads(stack.default_model)
    assert set(got) == set(ref)
    exact = [n for n in got if n not in compressed]
    assert any(n.endswith("o_proj.weight") for n in exact) and any(n.endswith("norm.weight") for n in exact)
    for n in exact:
        assert_close(got[n], ref[n], n)
    for n in compressed:  # VeLoRA changes these: they must differ (the test can fail)
        assert not torch.allclose(got[n], ref[n], rtol=1e-2, atol=0), n


def test_stack_compressed_dw_equals_formula_on_captured_x_and_g(stack):
    vs = directions(stack.model)
    got = grads(stack.model)
    rep = velora_fx.report(stack.model)
    for r in rep.compressed:
        module = r.weight.rsplit(".", 1)[0]
        v = vs[r.weight]
        assert v.shape == (STACK_CFG.sub_token_size_for(stack.seen[module]["x"].shape[-1]),)
        expected = velora_dw(stack.seen[module]["x"], stack.seen[module]["g"], v, STACK_CFG.scale)
        assert_close(got[r.weight], expected, r.weight)


def test_stack_v_calibrated_from_first_batch(stack):
    vs = directions(stack.model)
    assert len(vs) == 12
    assert state_keys(stack.model) == {f"velora_fx.{name}.v" for name in vs}
    for name, v in vs.items():
        module = name[: -len(".weight")]
        x = stack.seen[module]["x"]
        assert_close(v, ops.initial_direction(x, v.shape[0], name), name)


def test_stack_gradients_equal_velora_linear_reference(stack):
    ref = patched_with_velora_linear(stack.initial, directions(stack.model), STACK_CFG.scale)
    ref_loss, _ = saved_bytes_step(ref, stack.x)
    assert_close(stack.loss, ref_loss, "loss")
    got, want = grads(stack.model), grads(ref)
    for n in want:
        assert_close(got[n], want[n], n)


def test_stack_saves_the_expected_bytes(stack):
    rep = velora_fx.report(stack.model).compressed
    v_bytes = sum(v.numel() * 4 for v in directions(stack.model).values())
    saved = stack.default_bytes - stack.bytes
    # at least what the plan promises (p kept, X dropped); at most every compressed X (p recomputed)
    assert rep.bytes_saved - v_bytes <= saved <= rep.bytes_before, (saved, rep.bytes_saved, rep.bytes_before)
    assert stack.bytes < stack.default_bytes


def test_stack_no_weight_gradient_reads_a_compressed_input(stack):
    (g,) = stack.graphs
    xs = set(g.plan.groups)
    assert len(xs) == 6  # per block: the q/k/v input, the gate/up input, the down_proj input
    projections = [n for n in g.after.nodes if n.meta.get(META_KEY, {}).get("role") == "project"]
    assert {n.args[0] for n in projections if n.target is torch.ops.aten.constant_pad_nd.default} == xs  # padded
    fw = joint_plan._forward_nodes(g.after, ti.joint_layout(g.after).forward_outputs)
    for x in xs:  # only the inserted projection reads X outside the forward; no weight gradient does
        others = [u for u, _ in joint_plan._backward_uses(x, fw) if u.meta.get(META_KEY, {}).get("role") != "project"]
        assert others == [], x.format_node()
    # one p per stored tensor: the weights reading it share v (NOTE [one v per input])
    assert len([n for n in projections if n.target is torch.ops.aten.mm.default]) == len(xs)
    dws = [n for n in g.after.nodes if "weight_gradient" in n.meta.get(META_KEY, {})]
    assert len(dws) == 12 and sorted(n.meta[META_KEY]["weight_gradient"] for n in dws) == sorted(
        s.slot for s in g.plan.sites if s.status == COMPRESSED
    )
    for dw in dws:  # each is computed from p (the projection), never from X
        stack_, sources = list(dw.all_input_nodes), set()
        while stack_:
            n = stack_.pop()
            role = n.meta.get(META_KEY, {}).get("role")
            if role == "project" and n.target is torch.ops.aten.mm.default:  # p = X_rows @ v
                sources.add(n)
            elif role in ("weight_gradient", "project"):
                stack_.extend(n.all_input_nodes)
        assert sources, dw.format_node()
    # ... with matmuls only (extern kernels: nothing for Inductor to generate), but for the scale on G·p
    aten = torch.ops.aten
    for n in g.after.nodes:
        if n.meta.get(META_KEY, {}).get("role") == "weight_gradient":
            if n.target not in (aten.mm.default, aten.view.default, aten.slice.Tensor, aten.permute.default):
                assert n.target is aten.mul.Tensor and n.meta["val"].shape[-1] == STACK_CFG.num_groups, n.format_node()
    # every weight gradient here is an mm of views of X: served from p without rebuilding x̂
    assert not [n for n in g.after.nodes if n.meta.get(META_KEY, {}).get("role") == "reconstruct"]
    # the pass is idempotent: planning the rewritten graph finds nothing more to do
    again = jg.plan_joint_graph(g.after, g.spec, rewrite_options(STACK_CFG))
    assert not again.groups


def test_checkpoint_whose_shared_v_differ_warns_and_uses_the_first(stack, caplog):
    """q/k/v share one v (NOTE [one v per input]); a checkpoint where k's differs is loaded, warned about, and
    k then uses q's v: its buffer is q's tensor, and its dW is the formula with that v."""
    leader, follower = (f"layers.0.self_attn.{n}_proj.weight" for n in ("q", "k"))
    state = copy.deepcopy(stack.model.state_dict())
    assert torch.equal(state[f"velora_fx.{leader}.v"], state[f"velora_fx.{follower}.v"])
    state[f"velora_fx.{follower}.v"] = -state[f"velora_fx.{follower}.v"]
    fresh = velora_fx.prepare(copy.deepcopy(stack.initial))
    fresh.load_state_dict(state)  # the ordinary torch call: the prepared model creates the projections it reads
    compiled = torch.compile(fresh, backend=velora_fx.make_backend(STACK_CFG))
    with caplog.at_level(logging.WARNING, logger="velora_fx"):
        compiled(stack.x).float().pow(2).mean().backward()
    assert f"the projection of {follower} differs from that of {leader}" in caplog.text
    projs = velora_fx.projections(fresh)
    assert projs[follower].basis is projs[leader].basis and torch.equal(projs[leader].basis, state[f"velora_fx.{leader}.v"])
    assert torch.equal(fresh.state_dict()[f"velora_fx.{follower}.v"], state[f"velora_fx.{leader}.v"])


@pytest.mark.parametrize("init, sizes", [("batch_average_once", False), ("ema", False), ("random", False),
                                         ("batch_average_once", True), ("ema", True)])  # fmt: skip
def test_weights_reading_one_input_share_one_v(init, sizes):
    """q/k/v (and gate/up) read one input: one v for them unless init="random" (seeded per weight name) or a
    per-weight size (``sizes``: ``v_proj`` and ``down_proj`` with their own ``num_groups``) sets one apart;
    every compressed dW is the VeLoRA formula with that weight's own buffer, step after step."""
    torch.manual_seed(7)
    own = {"*.v_proj.weight": Velora(num_groups=8, init=init, ema_decay=0.5),
           "*.down_proj.weight": Velora(num_groups=16, init=init, ema_decay=0.5)} if sizes else {}  # fmt: skip
    cfg = VeloraConfig(estimator=Velora(num_groups=4, init=init, ema_decay=0.5), overrides=own)
    model = LlamaStack(blocks=1, dim=32, heads=2, hidden=48)
    eager = copy.deepcopy(model)
    seen, _ = capture_linears(eager)
    compiled = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))
    for step in range(2):
        x = torch.randn(2, 8, 32) + step
        for p in list(model.parameters()) + list(eager.parameters()):
            p.grad = None
        saved_bytes_step(compiled, x)
        saved_bytes_step(eager, x)
    projs = velora_fx.projections(model)
    assert state_keys(model) == {f"velora_fx.{name}.v" for name in projs}
    buffers = {name: p.basis for name, p in projs.items()}
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        vs = [buffers[f"layers.0.{name}.weight"] for name in group]
        if init == "random":
            assert len({id(v) for v in vs}) == len(vs) and not torch.equal(vs[0], vs[1])
        elif sizes and group[-1] == "self_attn.v_proj":
            assert vs[1] is vs[0] and vs[2] is not vs[0] and (vs[0].shape, vs[2].shape) == ((8,), (4,))
        else:
            assert all(v is vs[0] for v in vs)
    if sizes:
        assert buffers["layers.0.mlp.down_proj.weight"].shape == (3,)  # 48 features in 16 groups
    compressed = velora_fx.report(model).compressed
    assert len(compressed) == 6
    for r in compressed:
        module = r.weight.rsplit(".", 1)[0]
        want = velora_dw(seen[module]["x"], seen[module]["g"], buffers[r.weight], 1.0)
        assert_close(model.get_parameter(r.weight).grad, want, r.weight)


class _ReadsFirstUsesLast(nn.Module):
    """``q``'s weight is read first (so Dynamo lifts it first: it leads the shared v) but multiplied last."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)

    def forward(self, x):
        wq = self.q.weight
        return (torch.nn.functional.linear(x, self.k.weight) * torch.nn.functional.linear(x, wq)).sum(-1)


def test_refreshed_shared_v_is_computed_before_the_first_matmul_of_its_group():
    torch.manual_seed(8)
    model = _ReadsFirstUsesLast()
    compiled = torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=4, init="ema"))))
    x = torch.randn(2, 8, 32)
    saved_bytes_step(compiled, x)
    buffers = {name: p.basis for name, p in velora_fx.projections(model).items()}
    assert buffers["k.weight"] is buffers["q.weight"]
    ys = {name: torch.nn.functional.linear(x, getattr(model, name).weight.detach()).requires_grad_() for name in "qk"}
    (ys["k"] * ys["q"]).sum(-1).pow(2).mean().backward()  # saved_bytes_step's loss, on the outputs: g of each
    for name in "qk":
        want = velora_dw(x, ys[name].grad, buffers[f"{name}.weight"], 1.0)
        assert_close(getattr(model, name).weight.grad, want, name)


# -- the plan, on the captured joint graph, for many configs (no compile) ---------------------


def _respec(spec: GraphSpec, cfg: VeloraConfig) -> GraphSpec:
    """The slots the backend would build under ``cfg`` (same basis inputs; sizes, exclusions and leaders as ``cfg``
    says)."""
    slots = []
    for s in spec.slots:
        d = cfg.sub_token_size_for(s.features) if s.features else None
        excluded = cfg.why_excluded(s.name)
        if s.basis_primal is not None and d is not None and d > 1 and not excluded:
            slots.append(dataclasses.replace(s, basis_shape=(d, 1)))
        else:
            slots.append(dataclasses.replace(s, basis_primal=None, basis_shape=None, leader=None,
                                             reason=excluded or "too small"))  # fmt: skip
    # a weight whose leader became exact leads its own basis input (as the backend would give it one)
    slots = [dataclasses.replace(s, leader=None) if s.leader is not None and slots[s.leader].basis_primal is None
             else s for s in slots]  # fmt: skip
    return dataclasses.replace(spec, slots=tuple(slots))


def _graph_for(before: torch.fx.Graph, spec: GraphSpec) -> torch.fx.Graph:
    """A copy of ``before`` whose basis inputs have the sizes ``spec`` gives them (as a real compile would)."""
    graph = copy.deepcopy(before)
    inputs = {i: n for n, i in ti.joint_layout(graph).input_index.items()}
    for s in spec.slots:
        if s.basis_primal is not None:
            node = inputs[s.basis_primal]
            node.meta = dict(node.meta, val=node.meta["val"].new_empty((s.sub_token_size,)))
    return graph


_PATTERNS = ["*.q_proj.weight", "*.k_proj.weight", "*.v_proj.weight", "*.up_proj.weight", "*.down_proj.weight", "layers.1.*"]


@settings(max_examples=15)
@given(
    groups=st.integers(1, 100),
    exclude=st.lists(st.sampled_from(_PATTERNS), max_size=3, unique=True),
    min_bytes=st.sampled_from([0, 4096, 10**6]),
)
def test_plan_invariants_for_any_config(stack, groups, exclude, min_bytes):
    (g,) = stack.graphs
    cfg = VeloraConfig(estimator=Velora(num_groups=groups), exclude=tuple(exclude), min_saved_bytes=min_bytes)
    spec = _respec(g.spec, cfg)
    graph = _graph_for(g.before, spec)
    plan = jg.plan_joint_graph(graph, spec, rewrite_options(cfg))
    records = _records(plan, spec)
    assert len(records) == 14
    for r in records:
        assert r.status in (COMPRESSED, SKIPPED) and r.reason
        assert r.bytes_after <= r.bytes_before or r.bytes_before == 0
        if r.status == COMPRESSED:
            assert cfg.why_excluded(r.weight) is None
            assert r.sub_token_size == cfg.sub_token_size_for(r.input_shape[-1])
            assert r.input_shape[-1] >= groups
        if r.weight.endswith("o_proj.weight"):
            assert r.status == SKIPPED
    # q/k/v (and gate/up) share one input: all compressed or all skipped
    for block in ("layers.0", "layers.1"):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            statuses = {r.status for r in records if r.weight.split(".")[-2] in group and r.weight.startswith(block)}
            assert len(statuses) == 1, (block, group, statuses)
    if min_bytes > 10**5:
        assert not plan.groups
    changed = jg.apply_joint_plan(graph, plan, spec, rewrite_options(cfg))
    assert changed == bool(plan.groups or plan.markers)
    graph.lint()
    fw = joint_plan._forward_nodes(graph, ti.joint_layout(graph).forward_outputs)
    for x in plan.groups:
        assert all(u.meta[META_KEY]["role"] == "project" for u, _ in joint_plan._backward_uses(x, fw))


def test_excluded_input_sharer_keeps_the_shared_input_exact(stack):
    (g,) = stack.graphs
    cfg = VeloraConfig(estimator=Velora(num_groups=8), exclude=("*.k_proj.weight",))
    spec = _respec(g.spec, cfg)
    records = _records(jg.plan_joint_graph(_graph_for(g.before, spec), spec, rewrite_options(cfg)), spec)
    q = [r for r in records if r.weight.endswith("q_proj.weight")]
    assert all(r.status == SKIPPED and "k_proj" in r.reason for r in q)
    down = [r for r in records if r.weight.endswith("down_proj.weight")]
    assert all(r.status == COMPRESSED for r in down)


def test_too_small_features_are_skipped_with_reason(stack):
    (g,) = stack.graphs
    cfg = VeloraConfig(estimator=Velora(num_groups=80))  # > 64: only down_proj (D=96) can be split
    spec = _respec(g.spec, cfg)
    for r in _records(jg.plan_joint_graph(_graph_for(g.before, spec), spec, rewrite_options(cfg)), spec):
        if r.weight.endswith("down_proj.weight"):
            assert r.status == COMPRESSED
        else:
            assert r.status == SKIPPED


def test_pass_uuid_covers_config_and_slots(stack):
    (g,) = stack.graphs
    a = jg.VeloraJointPass(g.spec, rewrite_options(STACK_CFG)).uuid()
    assert a == jg.VeloraJointPass(g.spec, rewrite_options(VeloraConfig.from_dict(STACK_CFG.to_dict()))).uuid()
    assert a != jg.VeloraJointPass(g.spec, rewrite_options(dataclasses.replace(STACK_CFG, scale=1.0))).uuid()
    assert a != jg.VeloraJointPass(_respec(g.spec, VeloraConfig(estimator=Velora(num_groups=8))), rewrite_options(STACK_CFG)).uuid()
    assert isinstance(a, str) and len(a) == 64


# -- graph breaks, two instances of one class ---------------------------------------------------


@pytest.fixture(scope="module")
def broken():
    torch.manual_seed(1)
    model = BrokenStack()
    initial = copy.deepcopy(model)
    default_model = copy.deepcopy(model)
    x = torch.randn(3, 5, 32)
    counting = Counting(velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8))))
    compiled = torch.compile(model, backend=counting)
    loss, _ = saved_bytes_step(compiled, x)
    default_loss, _ = saved_bytes_step(torch.compile(default_model), x)
    eager = copy.deepcopy(initial)
    seen, handles = capture_linears(eager)
    saved_bytes_step(eager, x)
    for h in handles:
        h.remove()
    return Run(model=model, compiled=compiled, initial=initial, default_model=default_model, x=x,
                                 loss=loss, default_loss=default_loss, counting=counting, seen=seen)  # fmt: skip


def test_graph_break_every_graph_rewritten_and_reported(broken):
    rep = velora_fx.report(broken.model)
    assert broken.counting.calls >= 3
    assert len({r.graph for r in rep}) == broken.counting.calls
    weights = [r.weight for r in rep]
    assert len(weights) == len(set(weights)) == 9  # proj_in + 4 linears per block, each reported once
    # the block graphs are compiled once and shared by both instances; both are reported under their own names
    for i in (0, 1):
        assert {f"layers.{i}.mlp.down_proj.weight", f"layers.{i}.out.weight"} <= set(weights)
    for r in rep:
        if r.weight.endswith("out.weight"):
            assert r.status == SKIPPED and "kept for backward anyway" in r.reason, r  # tanh keeps its output
    assert {r.weight for r in rep.compressed} == {w for w in weights if not w.endswith("out.weight")}
    assert "layers.1.mlp.gate_proj.weight, layers.1.mlp.up_proj.weight read one input and keep one p" in next(
        r.reason for r in rep if r.weight == "layers.1.mlp.gate_proj.weight")


def test_graph_break_two_instances_use_their_own_v(broken):
    vs = directions(broken.model)
    v0, v1 = vs["layers.0.mlp.down_proj.weight"], vs["layers.1.mlp.down_proj.weight"]
    assert not torch.allclose(v0, v1)
    for name, v in vs.items():
        module = name[: -len(".weight")]
        assert_close(v, ops.initial_direction(broken.seen[module]["x"], v.shape[0], name), name)
    got = grads(broken.model)
    for r in velora_fx.report(broken.model).compressed:
        module = r.weight.rsplit(".", 1)[0]
        expected = velora_dw(broken.seen[module]["x"], broken.seen[module]["g"], vs[r.weight], 1.0)
        assert_close(got[r.weight], expected, r.weight)


def test_graph_break_gradients(broken):
    assert_close(broken.loss, broken.default_loss, "loss")
    compressed = {r.weight for r in velora_fx.report(broken.model).compressed}
    got, ref = grads(broken.model), grads(broken.default_model)
    for n in ref:
        if n not in compressed:
            assert_close(got[n], ref[n], n)
    velora_ref = patched_with_velora_linear(broken.initial, directions(broken.model), 1.0)
    saved_bytes_step(velora_ref, broken.x)
    for n, want in grads(velora_ref).items():
        assert_close(got[n], want, n)


# -- tied weights ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied():
    torch.manual_seed(2)
    model = TiedLM()
    initial = copy.deepcopy(model)
    default_model = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (2, 12))
    compiled = torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=4))))
    loss, nbytes = saved_bytes_step(compiled, tokens)
    default_loss, default_bytes = saved_bytes_step(torch.compile(default_model), tokens)
    return Run(model=model, initial=initial, default_model=default_model, tokens=tokens, loss=loss,
                                 default_loss=default_loss)  # fmt: skip


def test_tied_weight_has_one_v_shared_by_its_uses(tied):
    rep = velora_fx.report(tied.model)
    by_weight = {r.weight: r for r in rep}
    assert by_weight["embed.weight"].status == COMPRESSED  # the output projection's input
    assert by_weight["fc1.weight"].status == COMPRESSED
    assert by_weight["fc2.weight"].status == SKIPPED and "kept for backward anyway" in by_weight["fc2.weight"].reason
    assert set(directions(tied.model)) == {"embed.weight", "fc1.weight"}
    assert_close(tied.loss, tied.default_loss, "loss")
    # embedding gradient (exact) + output projection gradient (VeLoRA), as velora_linear computes them
    ref = copy.deepcopy(tied.initial)
    v = directions(tied.model)

    def forward(self, t):
        h = self.embed(t)
        hidden = ops.velora_linear(h, self.fc1.weight, self.fc1.bias, v["fc1.weight"])
        h = h + self.fc2(torch.relu(hidden))
        return ops.velora_linear(h, self.embed.weight, None, v["embed.weight"])

    ref.forward = types.MethodType(forward, ref)
    saved_bytes_step(ref, tied.tokens)
    got, want, exact = grads(tied.model), grads(ref), grads(tied.default_model)
    for n in want:
        assert_close(got[n], want[n], n)
    assert_close(got["fc2.weight"], exact["fc2.weight"], "fc2.weight")


# -- dynamic shapes, recompiles, inference, state_dict -------------------------------------------


@pytest.fixture(scope="module")
def dynamic():
    torch.manual_seed(3)
    model = TinyMLP()
    default_model = copy.deepcopy(model)
    backend = Counting(velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8))))
    default_backend = Counting(_inductor)
    compiled = torch.compile(velora_fx.prepare(model), backend=backend)
    default_compiled = torch.compile(default_model, backend=default_backend)
    losses, vs = [], []
    for seq in (6, 9, 13, 17):
        x = torch.randn(2, seq, 32)
        losses.append((saved_bytes_step(compiled, x)[0], saved_bytes_step(default_compiled, x)[0]))
        vs.append(directions(model))
    return Run(model=model, compiled=compiled, backend=backend, default_backend=default_backend,
                                 losses=losses, vs=vs, default_model=default_model)  # fmt: skip


def test_dynamic_shapes_no_extra_recompiles(dynamic):
    assert dynamic.backend.calls == dynamic.default_backend.calls <= 2
    for got, want in dynamic.losses:
        assert_close(got, want, "loss")
    first = dynamic.vs[0]
    assert set(first) == {"fc1.weight", "fc2.weight"}
    for later in dynamic.vs[1:]:
        assert all(torch.equal(first[k], later[k]) for k in first)
    # the report counts one step: the dynamic graph replaced the static one (same weights), each site listed once
    rep = velora_fx.report(dynamic.model)
    assert len({r.graph for r in rep}) == 1 and [r.weight for r in rep] == ["fc1.weight", "fc2.weight"]


def _assert_same_next_step(dynamic, compiled, fresh, x):
    """One more step of the trained model and of the resumed ``fresh`` one: bit-identical loss, grads and v."""
    for p in list(fresh.parameters()) + list(dynamic.model.parameters()):
        p.grad = None
    loss_a, _ = saved_bytes_step(dynamic.compiled, x)
    loss_b, _ = saved_bytes_step(compiled, x)
    assert torch.equal(loss_a, loss_b)
    ga, gb = grads(dynamic.model), grads(fresh)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    assert all(torch.equal(a, b) for a, b in zip(directions(dynamic.model).values(), directions(fresh).values()))


def test_state_dict_round_trip_gives_the_same_next_step(dynamic):
    torch.manual_seed(4)
    x1, x2 = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    state = copy.deepcopy(dynamic.model.state_dict())
    assert "velora_fx.fc2.weight.v" in state and state["velora_fx.fc2.weight.v"].abs().sum() > 0
    fresh = velora_fx.prepare(TinyMLP())
    compiled = torch.compile(fresh, backend=dynamic.backend)  # same backend: Dynamo reuses the graphs
    with torch.no_grad():
        compiled(x1)  # a first call under no_grad creates no projection ...
    assert not directions(fresh) and not state_keys(fresh)
    compiled(x1).sum()  # ... a training call does (and calibrates on x1)
    assert not torch.equal(directions(fresh)["fc2.weight"], state["velora_fx.fc2.weight.v"])
    fresh.load_state_dict(state)
    _assert_same_next_step(dynamic, compiled, fresh, x2)


def test_resume_into_a_fresh_model_before_its_first_call(dynamic):
    torch.manual_seed(5)
    x = torch.randn(2, 9, 32)
    state = copy.deepcopy(dynamic.model.state_dict())
    fresh = TinyMLP()
    with pytest.raises(RuntimeError, match=r"Unexpected key.*velora_fx\.fc1\.weight\.v"):
        fresh.load_state_dict(state)  # a model that was not prepared has no place for them
    velora_fx.prepare(fresh).load_state_dict(state)  # the documented way: prepare, then the ordinary call
    compiled = torch.compile(fresh, backend=dynamic.backend)
    _assert_same_next_step(dynamic, compiled, fresh, x)


def test_inference_graph_is_the_default_one(dynamic):
    fresh = TinyMLP()
    fresh.load_state_dict({k: v for k, v in dynamic.model.state_dict().items() if not k.startswith("velora_fx.")})
    backend = Counting(velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8))))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = torch.compile(fresh.eval(), backend=backend)(x)
    assert backend.calls == 1
    assert not isinstance(backend.last, CompiledGraph)  # compile_fx's own callable
    assert not directions(fresh) and len(velora_fx.report(fresh)) == 0
    torch.testing.assert_close(out, dynamic.default_model.eval()(x), rtol=RTOL, atol=ATOL)


# -- init modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["batch_average", "ema"])
def test_refreshed_v_follows_every_step_without_recompiling(init):
    torch.manual_seed(5)
    cfg = VeloraConfig(estimator=Velora(num_groups=8, init=init, ema_decay=0.5))
    model = TinyMLP()
    backend = Counting(velora_fx.make_backend(cfg))
    compiled = torch.compile(model, backend=backend)
    eager = copy.deepcopy(model)
    seen, _ = capture_linears(eager)
    history = []
    for step in range(3):
        x = torch.randn(2, 8, 32) + step
        for p in list(model.parameters()) + list(eager.parameters()):
            p.grad = None
        saved_bytes_step(compiled, x)
        eager(x)
        history.append((directions(model), {k: seen[k]["x"] for k in seen}))
    assert backend.calls == 1
    (v0, x0), *rest = history
    for name in ("fc1", "fc2"):
        key = f"{name}.weight"
        assert_close(v0[key], ops.initial_direction(x0[name], v0[key].shape[0], key), key)
        prev = v0[key]
        for v, xs in rest:
            want = ops.refreshed_direction(prev, xs[name], cfg.ema_decay if init == "ema" else None)
            assert_close(v[key], want, key)
            assert not torch.allclose(v[key], prev)
            prev = v[key]
    # the step used this step's v: dW matches the formula with the refreshed v
    x = torch.randn(2, 8, 32) * 3 - 1
    for p in list(model.parameters()) + list(eager.parameters()):
        p.grad = None
    saved_bytes_step(compiled, x)
    saved_bytes_step(eager, x)
    v = directions(model)["fc2.weight"]
    assert_close(model.fc2.weight.grad, velora_dw(seen["fc2"]["x"], seen["fc2"]["g"], v, 1.0), "fc2.weight")


def test_random_init_and_mode_option():
    torch.manual_seed(6)
    cfg = VeloraConfig(estimator=Velora(num_groups=8, init="random"), seed=3)
    model = TinyMLP()
    compiled = torch.compile(model, backend=velora_fx.make_backend(cfg), mode="reduce-overhead")
    saved_bytes_step(compiled, torch.randn(2, 4, 32))
    for key, v in directions(model).items():
        assert torch.equal(v, ops.random_direction(v.shape[0], 3, key))


def test_backend_rejects_unknown_arguments_and_configs():
    with pytest.raises(ValueError, match="VeloraConfig"):
        velora_fx.make_backend({"num_groups": 8})
    with pytest.raises(ValueError, match="unexpected arguments"):
        velora_fx.backend(None, [], fancy=True)
    assert ti.mode_config_patches("max-autotune-no-cudagraphs", None).get("max_autotune") is True


# -- compile caches ---------------------------------------------------------------------------------


def test_cache_hit_is_still_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(7)
    model = TinyMLP(dim=24, hidden=40)
    cfg = VeloraConfig(estimator=Velora(num_groups=4))
    x = torch.randn(2, 6, 24)
    with ti.compile_caches(True):
        torch._dynamo.reset()
        _, cold = saved_bytes_step(torch.compile(copy.deepcopy(model), backend=velora_fx.make_backend(cfg)), x)
        torch._dynamo.reset()
        hits = aot_cache_hits()
        warm_model = copy.deepcopy(model)
        _, warm = saved_bytes_step(torch.compile(warm_model, backend=velora_fx.make_backend(cfg)), x)
        assert aot_cache_hits() > hits
        torch._dynamo.reset()
        _, default = saved_bytes_step(torch.compile(copy.deepcopy(model)), x)
    assert warm == cold < default
    rep = velora_fx.report(warm_model)
    assert [r.status for r in rep] == [COMPRESSED, COMPRESSED]


# -- the pass as Inductor runs it: guarded, chained, described ---------------------------------------------------


def _generated_kernels(code: list[str]) -> int:
    return sum(len(re.findall(r"= async_compile\.(?:cpp|triton)", c)) for c in code)


def test_rewritten_graphs_generate_no_more_kernels_than_the_default_ones():
    """The projection, dW and any x̂ are extern matmuls (``aten.mm``): Inductor generates no kernel for them."""
    torch.manual_seed(13)
    model = LlamaStack(blocks=1, dim=64, heads=4, hidden=128)  # d divides D: no padding kernel
    default_model = copy.deepcopy(model)
    x = torch.randn(2, 16, 64)
    with ti.compile_caches(False):
        velora_code = generated_code(lambda: saved_bytes_step(
            torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8)))), x))
        default_code = generated_code(lambda: saved_bytes_step(torch.compile(default_model), x))
    assert len(velora_fx.report(model).compressed) == 6
    assert 0 < _generated_kernels(velora_code) <= _generated_kernels(default_code)


def test_shared_code_is_traced_once_per_key_and_signature_and_computes_what_inlined_code_does():
    """``GraphWriter.shared`` (``ti.trace_shared``): one subgraph per (key, input signature), one ``invoke_subgraph``
    call per use with fresh fake outputs, an input the code ignores left out of the call, a backward call tagged to
    be recomputed there; the graph computes what the code does. Symbolic sizes, or an output that aliases an input,
    inline the code instead (as ``trace``)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.checkpoint import CheckpointPolicy

    from velora_fx.passes.graph_writer import GraphWriter

    def f(x, key):  # ignores the key
        return x * 2 + 1, x.sum(-1)

    def g(x, key):
        return x * key.sum()

    gm = make_fx(lambda a, b, k: (a.sin(), b.cos(), k + 1), tracing_mode="fake")(*[torch.randn(4, 8)] * 2, torch.randn(3))
    a, b, k = gm.graph.find_nodes(op="placeholder")
    output = gm.graph.find_nodes(op="output")[0]
    w = GraphWriter(gm.graph, output, "project")
    first, second = w.shared(f, [a, k], key="f"), w.shared(f, [b, k], key="f")
    third = w.shared(g, [a, k], key="g", backward=True)
    calls = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
    assert len(calls) == 3 and len({c.args[0].target for c in calls}) == 2
    assert [c.args[2:] for c in calls] == [(a,), (b,), (a, k)]
    assert first[0].meta["val"] is not second[0].meta["val"] and first[0].meta[META_KEY] == {"role": "project"}
    assert calls[2].meta["recompute"] == CheckpointPolicy.MUST_RECOMPUTE and "recompute" not in calls[0].meta
    assert ti.is_shared_subgraph(getattr(gm, calls[0].args[0].target).graph) and not ti.is_shared_subgraph(gm.graph)
    output.args = ((*output.args[0], *first, *second, third),)
    gm.recompile()
    x, y, key = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3)
    got = gm(x, y, key)
    for have, want in zip(got[3:], (*f(x, key), *f(y, key), g(x, key))):
        assert torch.equal(have, want)  # the same ops on the same values

    symbolic = make_fx(lambda a, k: a.sin(), tracing_mode="symbolic")(torch.randn(4, 8), torch.randn(3))
    a, k = symbolic.graph.find_nodes(op="placeholder")
    w = GraphWriter(symbolic.graph, symbolic.graph.find_nodes(op="output")[0], "project")
    w.shared(f, [a, k], key="f")
    assert w.shared(lambda x, key: x.view(-1), [a, k], key="alias").target is torch.ops.aten.view.default
    assert not symbolic.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
    fake = make_fx(lambda a, k: a.sin(), tracing_mode="fake")(torch.randn(4, 8), torch.randn(3))
    a, k = fake.graph.find_nodes(op="placeholder")
    w = GraphWriter(fake.graph, fake.graph.find_nodes(op="output")[0], "project")
    assert w.shared(lambda x, key: x[:2], [a, k], key="alias").target is torch.ops.aten.slice.Tensor  # inlined
    assert not fake.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)


def test_a_failing_rewrite_leaves_the_graph_exact(stack, monkeypatch, caplog):
    """Apply is guarded as planning is: an error half-way leaves the joint graph exactly as it was, and says so."""
    (g,) = stack.graphs
    graph = copy.deepcopy(g.before)
    code = torch.fx.GraphModule(torch.nn.Module(), graph).code
    calls = []
    original = joint_rewrite._weight_grad

    def fail_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return original(*args)

    monkeypatch.setattr(joint_rewrite, "_weight_grad", fail_on_the_third)
    with caplog.at_level(logging.WARNING, logger="velora_fx"):
        result, plan = jg.velora_joint_pass(graph, g.spec, rewrite_options(STACK_CFG))
    assert len(calls) == 3 and not result.modified and not plan.sites
    assert "rewriting graph" in caplog.text and "stays exact" in caplog.text
    assert torch.fx.GraphModule(torch.nn.Module(), graph).code == code
    graph.lint()
    assert ti.joint_layout(graph).input_index  # the descriptors came back too


def test_a_graph_without_descriptors_stays_exact(stack, caplog):
    (g,) = stack.graphs
    graph = copy.deepcopy(g.before)
    for node in graph.find_nodes(op="placeholder"):
        node.meta.pop("desc", None)
    with caplog.at_level(logging.WARNING, logger="velora_fx"):
        result, _ = jg.velora_joint_pass(graph, g.spec, rewrite_options(STACK_CFG))
    assert not result.modified and "no AOTAutograd descriptor" in caplog.text


def test_the_rewritten_graph_is_not_printed_unless_debugging(stack, monkeypatch, caplog):
    (g,) = stack.graphs
    printed = []
    monkeypatch.setattr(torch.fx.Graph, "__str__", lambda self: printed.append(1) or "graph")
    jg.VeloraJointPass(g.spec, rewrite_options(STACK_CFG))(copy.deepcopy(g.before))
    assert not printed
    caplog.set_level(logging.DEBUG, logger="velora_fx.passes.joint_graph")
    jg.VeloraJointPass(g.spec, rewrite_options(STACK_CFG))(copy.deepcopy(g.before))
    assert printed and "rewritten joint graph of graph" in caplog.text


class _UserJointPass(ti.CustomGraphPass):
    def __init__(self):
        self.seen = []

    def __call__(self, graph):
        self.seen.append(sum(1 for n in graph.nodes if n.meta.get(META_KEY, {}).get("role") == "project"
                             and n.target is torch.ops.aten.mm.default))  # fmt: skip

    def uuid(self):
        return "a user's joint pass"


def test_a_users_joint_pre_pass_is_chained_not_replaced():
    import torch._inductor.config as inductor_config

    user = _UserJointPass()
    torch.manual_seed(14)
    model = TinyMLP(dim=24, hidden=40)
    with inductor_config.patch(joint_custom_pre_pass=user), ti.compile_caches(False):
        saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=4)))),
                         torch.randn(2, 3, 24))  # fmt: skip
        assert inductor_config.joint_custom_pre_pass is user  # restored after the compile
    assert user.seen == [2]  # it ran, after ours (it saw our two projections)
    assert len(velora_fx.report(model).compressed) == 2


def test_chained_passes_for_a_torch_with_one_pass_per_slot():
    """torch 2.11 takes one pass per slot: ours and the user's run as one, in order, cacheable only if both are."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    order = []

    class Named(CustomGraphPass):
        def __init__(self, name):
            self.name = name

        def __call__(self, graph):
            order.append(self.name)

        def uuid(self):
            return self.name

    chained = ti._chained([Named("ours"), Named("theirs")])
    chained(torch.fx.Graph())
    assert order == ["ours", "theirs"] and isinstance(chained, CustomGraphPass)
    assert chained.uuid() == ("ours", "theirs")
    plain = ti._chained([Named("ours"), lambda graph: order.append("a function")])
    plain(torch.fx.Graph())
    assert order[2:] == ["ours", "a function"] and not isinstance(plain, CustomGraphPass)
