"""velora_fx.backend in the training setups people use: mixed precision, activation checkpointing inside the
compiled model, gradient accumulation, AdamW over several steps, train()/eval() toggling, no_grad inference.

What VeLoRA approximates (the compressed weights' dW) differs from the default backend by design; what is
exact (loss, outputs, every other gradient) is compared with the default ``torch.compile``, and the whole
trajectory is compared with a reference built from ``velora_fx.ops.velora_linear`` with the same ``v``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import velora_fx
from velora_fx import Velora, VeloraConfig
from velora_fx.report import COMPRESSED

from .backend_models import LlamaStack, SwiGLU, TinyMLP
from .helpers import Run, assert_close, capture_linears, directions, grads, patched_with_velora_linear, saved_bytes_step

CFG = VeloraConfig(estimator=Velora(num_groups=8))
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    """TinyMLP is compiled by many backends in this session: start this module below Dynamo's recompile limit
    (past it Dynamo runs the frame eagerly, without any backend)."""
    torch._dynamo.reset()


def _close_bf16(a, b, what):
    scale = max(1.0, float(b.float().abs().max()))
    torch.testing.assert_close(a.float(), b.float(), rtol=BF16_TOL["rtol"], atol=BF16_TOL["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


def saved_tensors(fn, *inputs, loss_fn=lambda out: out.float().pow(2).mean()):
    """Loss, and (shape, dtype) of every tensor saved for backward during the forward."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(fn(*inputs))
    loss.backward()
    return loss.detach(), saved


# -- mixed precision ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def autocast_run():
    torch.manual_seed(0)
    model = LlamaStack(blocks=1, dim=64, heads=4, hidden=96)
    default_model, eager = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, saved = saved_tensors(torch.compile(model, backend=velora_fx.make_backend(CFG)), x)
        default_loss, default_saved = saved_tensors(torch.compile(default_model), x)
        seen, handles = capture_linears(eager)
        saved_tensors(eager, x)
    for h in handles:
        h.remove()
    return Run(model=model, default_model=default_model, loss=loss, saved=saved, default_loss=default_loss,
               default_saved=default_saved, seen=seen)  # fmt: skip


def test_autocast_exact_grads_equal_default(autocast_run):
    _close_bf16(autocast_run.loss, autocast_run.default_loss, "loss")
    compressed = {r.weight for r in velora_fx.report(autocast_run.model).compressed}
    assert len(compressed) == 6  # all but o_proj
    got, ref = grads(autocast_run.model), grads(autocast_run.default_model)
    for n in got:
        assert got[n].dtype == torch.float32  # fp32 master weights
        if n not in compressed:
            _close_bf16(got[n], ref[n], n)


def _nbytes(saved):
    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size() for shape, dt in saved)


def test_autocast_projections_in_activation_dtype(autocast_run):
    """Under autocast the linear inputs are bf16 and so are the projections: the report's dtype, and the ``v``
    the backward reads, are bf16. (Here the min-cut partitioner recomputes ``p`` in backward from the fp32
    residual it keeps anyway for the norms, rather than saving it: fewer bytes kept than the default.)"""
    for r in velora_fx.report(autocast_run.model).compressed:
        assert r.dtype == "bfloat16", r
    sizes = {4, 8, 12}  # d of the (.., 64) and (.., 96) inputs at 8 groups (d = 8, 12), and o_proj's 4x16 (d = 2)
    vs = [dt for shape, dt in autocast_run.saved if _is_vector(shape) and max(shape) in sizes]  # v as a row / column
    assert vs and all(dt == torch.bfloat16 for dt in vs), autocast_run.saved
    assert _nbytes(autocast_run.saved) < _nbytes(autocast_run.default_saved)
    assert all(p.basis.dtype == torch.float32 for p in velora_fx.projections(autocast_run.model).values())


def _is_vector(shape) -> bool:
    return len(shape) > 0 and sorted(shape)[:-1] == [1] * (len(shape) - 1)


def test_autocast_dw_equals_formula_bf16_tolerance(autocast_run):
    vs, got = directions(autocast_run.model), grads(autocast_run.model)
    for r in velora_fx.report(autocast_run.model).compressed:
        rec = autocast_run.seen[r.weight.rsplit(".", 1)[0]]
        x = rec["x"].to(torch.bfloat16).double()  # autocast casts the linear's input to bf16
        v = vs[r.weight].double()
        x_hat = velora_fx.reconstruct(velora_fx.project(x, v), v, x.shape[-1]).reshape(-1, x.shape[-1])
        want = rec["g"].double().reshape(-1, rec["g"].shape[-1]).t() @ x_hat
        _close_bf16(got[r.weight], want, r.weight)


def test_bf16_weights():
    torch.manual_seed(1)
    model = TinyMLP(dim=32, hidden=48).to(torch.bfloat16)
    default_model = copy.deepcopy(model)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    loss, saved = saved_tensors(torch.compile(model, backend=velora_fx.make_backend(CFG)), x)
    default_loss, default_saved = saved_tensors(torch.compile(default_model), x)
    _close_bf16(loss, default_loss, "loss")
    rep = velora_fx.report(model)
    assert [r.status for r in rep] == [COMPRESSED, COMPRESSED] and all(r.dtype == "bfloat16" for r in rep)
    got, ref = grads(model), grads(default_model)
    for n in ("fc1.bias", "fc2.bias"):
        _close_bf16(got[n], ref[n], n)
    assert all(g.dtype == torch.bfloat16 for g in got.values())
    # nothing upcast, p included (the (2, 8, 32) float32 one is the loss's out.float())
    assert all(dt == torch.bfloat16 for shape, dt in saved if shape != (2, 8, 32)), saved
    assert _nbytes(saved) < _nbytes(default_saved)


# -- activation checkpointing inside the compiled model ------------------------------------------------


class CheckpointedMLP(nn.Module):
    """A SwiGLU block run under ``torch.utils.checkpoint`` (non-reentrant) inside the model's forward."""

    def __init__(self, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.mlp = SwiGLU(dim, hidden)
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        h = x + checkpoint(self.mlp, x, use_reentrant=False)
        return self.head(F.gelu(h))


def test_activation_checkpointing_inside_compiled_model():
    """The checkpointed SwiGLU stays exact (its matmuls live in a ``tag_activation_checkpoint`` subgraph, which the
    backend does not rewrite: reported with the reason); ``head`` outside it is compressed."""
    torch.manual_seed(2)
    model = CheckpointedMLP()
    initial, default_model = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 8, 32)
    loss, _ = saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(CFG)), x)
    default_loss, _ = saved_bytes_step(torch.compile(default_model), x)
    assert_close(loss, default_loss, "loss")
    rep = velora_fx.report(model)
    assert {r.weight for r in rep.compressed} == {"head.weight"}, str(rep)
    for r in rep.skipped:
        assert r.weight.startswith("mlp.") and "activation checkpointing" in r.reason, r
    # every gradient equals velora_linear's with the same v (head) and the exact one (the rest)
    ref = patched_with_velora_linear(initial, directions(model), CFG.scale)
    ref_loss, _ = saved_bytes_step(ref, x)
    assert_close(loss, ref_loss, "loss vs velora_linear")
    got, want, exact = grads(model), grads(ref), grads(default_model)
    for n in want:
        assert_close(got[n], want[n], n)
        if n != "head.weight":
            assert_close(got[n], exact[n], n)


# -- gradient accumulation + AdamW + train/eval + no_grad, one trajectory --------------------------------


class StepMLP(TinyMLP):
    """TinyMLP with a forward of its own: its Dynamo cache is not shared with the many TinyMLP compiles of the suite."""

    def forward(self, x):
        return super().forward(x)


@pytest.fixture(scope="module")
def trajectory():
    """3 AdamW steps of 2 accumulated micro-batches each: the backend vs velora_linear with the same v."""
    torch.manual_seed(3)
    model = StepMLP(dim=32, hidden=48)
    initial = copy.deepcopy(model)
    compiled = torch.compile(model, backend=velora_fx.make_backend(CFG))
    batches = [[torch.randn(2, 6, 32) for _ in range(2)] for _ in range(3)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first_grads, vs_history = None, []
    for step, micro in enumerate(batches):
        for x in micro:
            (compiled(x).pow(2).mean() / len(micro)).backward()
        if step == 0:
            first_grads = grads(model)
        vs_history.append(directions(model))
        opt.step()
        opt.zero_grad(set_to_none=True)

    ref = patched_with_velora_linear(initial, vs_history[0], CFG.scale)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_first = None
    for step, micro in enumerate(batches):
        for x in micro:
            (ref(x).pow(2).mean() / len(micro)).backward()
        if step == 0:
            ref_first = grads(ref)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    exact = copy.deepcopy(initial)
    for x in batches[0]:
        (exact(x).pow(2).mean() / len(batches[0])).backward()
    return Run(model=model, compiled=compiled, initial=initial, ref=ref, batches=batches, first_grads=first_grads,
               ref_first=ref_first, exact_first=grads(exact), vs_history=vs_history)  # fmt: skip


def test_gradient_accumulation_sums_micro_batches(trajectory):
    compressed = {r.weight for r in velora_fx.report(trajectory.model).compressed}
    assert compressed == {"fc1.weight", "fc2.weight"}
    for n, want in trajectory.ref_first.items():
        assert_close(trajectory.first_grads[n], want, n)
    for n in ("fc1.bias", "fc2.bias"):  # exact
        assert_close(trajectory.first_grads[n], trajectory.exact_first[n], n)
    # v is calibrated on the first micro-batch only, then frozen
    first = trajectory.vs_history[0]
    assert all(torch.equal(first[k], later[k]) for later in trajectory.vs_history[1:] for k in first)


def test_adamw_trajectory_equals_velora_linear_reference(trajectory):
    for (n, p), (n_ref, p_ref) in zip(trajectory.model.named_parameters(), trajectory.ref.named_parameters()):
        assert n == n_ref
        assert_close(p.detach(), p_ref.detach(), n)
    assert not torch.allclose(trajectory.model.fc1.weight, trajectory.initial.fc1.weight)


def test_train_eval_toggle_and_no_grad(trajectory):
    model, compiled = trajectory.model, trajectory.compiled
    x = torch.randn(2, 5, 32)
    plain = copy.deepcopy(model)  # eager, same weights: the exact outputs
    want = plain.eval()(x)
    vs = directions(model)
    model.eval()
    try:
        with torch.no_grad():
            out = compiled(x)  # exactly the default backend's graph (no joint graph is built)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        out_grad = compiled(x)  # eval() with grad on: the forward is exact
        assert_close(out_grad.detach(), want, "eval output with grad")
    finally:
        model.train()
    loss = compiled(x).pow(2).mean()  # back to training: still the same v, still compressed
    loss.backward()
    assert all(torch.equal(vs[k], b) for k, b in directions(model).items())
    assert {r.weight for r in velora_fx.report(model).compressed} == {"fc1.weight", "fc2.weight"}
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), plain.eval()(x), rtol=1e-5, atol=1e-6)
