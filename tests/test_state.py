"""The state model (``velora_fx/state.py``): where projections live, what they are called, and what they survive.

* Names come from the prepared model, whatever wraps the call (a wrapper module, a function, a loop over blocks):
  the report, the ``state_dict`` keys, the include/exclude match and the ``random`` seed all use them.
* Both routes keep the same ``state_dict`` layout (``velora_fx.<weight>.v``) and load each other's checkpoints,
  and those of velora_fx 0.1.
* Casting the model (``.half()``, ``.to(torch.bfloat16)``, ``.double()``) after training never changes the
  projections nor the graphs' view of them: training on gives the VeLoRA formula's ``dW``.
* Nothing keeps a trained model alive (no ``torch._dynamo.reset()``), and velora_fx's tables do not grow per model.
* ``eval()`` with grad on: both routes compress (one rule).
"""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import fx, nn

import velora_fx
from velora_fx import Velora, VeloraConfig, ops
from velora_fx import runtime, state

from .backend_models import LlamaStack, TinyMLP
from .helpers import (
    assert_close,
    capture_linears,
    directions,
    grads,
    patched_with_velora_linear,
    saved_bytes_step,
    state_keys,
    velora_dw,
)

CFG = VeloraConfig(estimator=Velora(num_groups=4))


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def shared_backend():
    return velora_fx.make_backend(CFG)


def _tiny(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(dim=16, hidden=24)


# -- names ---------------------------------------------------------------------------------------------------


class Wrapper(nn.Module):
    """What DDP does to the module tree: the user's model becomes ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _step_for(how: str, model: LlamaStack, backend):
    if how == "model":
        return torch.compile(model, backend=backend)
    if how == "wrapper":
        return torch.compile(Wrapper(model), backend=backend)
    if how == "function":
        return torch.compile(lambda x: model(x), backend=backend)

    def loop(x):  # a graph per block (the same one, reused): the block's weights seen relative to the block
        for layer in model.layers:
            x = torch.compile(layer, backend=backend)(x)
        return model.norm(x)

    return loop


@pytest.mark.parametrize("how", ["model", "wrapper", "function", "loop"])
def test_names_do_not_depend_on_how_the_call_is_wrapped(how):
    cfg = VeloraConfig(estimator=Velora(num_groups=4, init="random"), seed=3, exclude=("layers.1.*",))
    torch.manual_seed(0)
    model = velora_fx.prepare(LlamaStack(blocks=2, dim=16, heads=2, hidden=24))
    step = _step_for(how, model, velora_fx.make_backend(cfg))
    saved_bytes_step(step, torch.randn(2, 6, 16))
    rep = velora_fx.report(model)
    block0 = {f"layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert {r.weight for r in rep.compressed} == block0, str(rep)  # exclude matched the prepared names
    assert {r.weight for r in rep} == {n for n, p in model.named_parameters() if p.dim() == 2}  # every site once
    assert len(rep) == len({(r.graph, r.node, r.weight) for r in rep})
    assert state_keys(model) == {f"velora_fx.{n}.v" for n in block0}
    for name, v in directions(model).items():  # seeded by the prepared name
        assert torch.equal(v, ops.random_direction(v.shape[0], 3, name)), name


def test_report_names_follow_the_object_asked():
    """``report(wrapper)`` names weights as ``wrapper.named_parameters()`` does (``module.`` prefix, as DDP's)."""
    model = velora_fx.prepare(_tiny(1))
    wrapper = Wrapper(model)
    saved_bytes_step(torch.compile(wrapper, backend=velora_fx.make_backend(CFG)), torch.randn(2, 3, 16))
    assert {r.weight for r in velora_fx.report(wrapper)} == {"module.fc1.weight", "module.fc2.weight"}
    assert {r.weight for r in velora_fx.report(model)} == {"fc1.weight", "fc2.weight"}
    assert {k for k in wrapper.state_dict() if "velora_fx" in k} == {"module.velora_fx.fc1.weight.v",
                                                                     "module.velora_fx.fc2.weight.v"}  # fmt: skip


# -- one layout, both routes; checkpoints -------------------------------------------------------------------


def test_both_routes_keep_one_layout_and_load_each_others_checkpoints(shared_backend):
    x = torch.randn(3, 5, 16)
    compiled_model = velora_fx.prepare(_tiny(2))
    saved_bytes_step(torch.compile(compiled_model, backend=shared_backend), x)
    gm = velora_fx.transform(fx.symbolic_trace(_tiny(2)), CFG)
    saved_bytes_step(gm, x)
    keys = {"velora_fx.fc1.weight.v", "velora_fx.fc2.weight.v"}
    assert state_keys(compiled_model) == state_keys(gm) == keys
    for name, v in directions(gm).items():  # the same rule, the same batch: the same v
        assert_close(v, directions(compiled_model)[name], name)
    # a fresh model of either route takes the other's checkpoint with the ordinary call
    fresh_gm = velora_fx.transform(fx.symbolic_trace(_tiny(3)), CFG)
    fresh_gm.load_state_dict(compiled_model.state_dict())
    fresh = velora_fx.prepare(_tiny(4))
    fresh.load_state_dict(gm.state_dict())
    for name, v in directions(compiled_model).items():
        assert torch.equal(directions(fresh_gm)[name], v)
    for name, v in directions(gm).items():
        assert torch.equal(directions(fresh)[name], v)


def test_checkpoints_of_velora_fx_0_1_load():
    v1, v2 = torch.nn.functional.normalize(torch.randn(4), dim=0), torch.nn.functional.normalize(torch.randn(6), dim=0)
    model = _tiny(5)
    backend_layout = dict(model.state_dict(), **{"fc1.weight_velora_v": v1, "fc2.weight_velora_v": v2})
    fx_layout = dict(model.state_dict(), **{"velora_fx.fc1_weight.v": v1, "velora_fx.fc2_weight.v": v2})
    for old in (backend_layout, fx_layout):
        fresh = velora_fx.prepare(_tiny(6))
        fresh.load_state_dict(old)
        assert torch.equal(directions(fresh)["fc1.weight"], v1) and torch.equal(directions(fresh)["fc2.weight"], v2)
        assert state_keys(fresh) == {"velora_fx.fc1.weight.v", "velora_fx.fc2.weight.v"}
        assert all(p.calibrated for p in velora_fx.projections(fresh).values())


def test_deepcopy_and_pickle_keep_projections_of_their_own(shared_backend):
    model = velora_fx.prepare(_tiny(7))
    saved_bytes_step(torch.compile(model, backend=shared_backend), torch.randn(2, 3, 16))
    twin = copy.deepcopy(model)
    assert velora_fx.projections(twin)["fc1.weight"] is not velora_fx.projections(model)["fc1.weight"]
    assert twin.velora_fx.name_of(twin.fc1.weight) == "fc1.weight"  # the copy's state knows the copy's parameters
    assert twin.velora_fx.name_of(model.fc1.weight) is None
    velora_fx.projections(twin)["fc1.weight"].set_basis(torch.ones(4))
    assert not torch.equal(directions(model)["fc1.weight"], torch.ones(4))
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert all(torch.equal(directions(loaded)[k], v) for k, v in directions(model).items())
    assert loaded.velora_fx.name_of(loaded.fc2.weight) == "fc2.weight"


def test_prepare_is_idempotent_and_refuses_nested_models():
    model = _tiny(8)
    assert velora_fx.prepare(model) is model and velora_fx.prepare(model) is model
    outer = Wrapper(model)
    with pytest.raises(ValueError, match=r"fc1\.weight already belongs to a prepared TinyMLP"):
        velora_fx.prepare(outer)
    with pytest.raises(TypeError, match="takes an nn.Module"):
        velora_fx.prepare(lambda x: x)


# -- casts after training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("route", ["backend", "fx"])
def test_training_on_after_a_dtype_cast(route, dtype, shared_backend):
    """One fp32 step calibrates; then the model is cast and trains on: the projections stay float32 and unchanged
    (not rounded, not reinterpreted), and the weight gradients are the formula's with them (velora_linear, eager)."""
    torch.manual_seed(9)
    model = _tiny(9)
    if route == "backend":
        velora_fx.prepare(model)
        step = torch.compile(model, backend=shared_backend)
    else:
        model = step = velora_fx.transform(fx.symbolic_trace(model), CFG)
    saved_bytes_step(step, torch.randn(2, 5, 16))
    before = directions(model)
    model.to(dtype)
    for p in model.parameters():
        p.grad = None
    assert all(p.basis.dtype == torch.float32 for p in velora_fx.projections(model).values())
    assert all(torch.equal(directions(model)[k], v) for k, v in before.items())
    x = torch.randn(2, 5, 16, dtype=dtype)
    ref = patched_with_velora_linear(model if route == "backend" else _as_tiny(model), before, 1.0)
    for p in ref.parameters():
        p.grad = None
    loss, _ = saved_bytes_step(step, x)
    ref_loss, _ = saved_bytes_step(ref, x)
    tol = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    got, want = grads(model), grads(ref)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in got.values())
    for n, w in want.items():
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(got[n].double(), w.double(), rtol=tol * 5, atol=tol * 5 * scale, msg=n)
    assert all(torch.equal(directions(model)[k], v) for k, v in before.items())


def _as_tiny(gm: fx.GraphModule) -> TinyMLP:
    """The eager TinyMLP with ``gm``'s weights (the FX route's GraphModule has the same submodules)."""
    tiny = TinyMLP(dim=16, hidden=24).to(gm.fc1.weight.dtype)
    tiny.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.startswith("velora_fx.")})
    return tiny


# -- nothing outlives the model ------------------------------------------------------------------------------


def _train_in_a_function(route: str, prepared: bool, backend) -> list[weakref.ref]:
    model = _tiny(10)
    refs = [weakref.ref(model), *map(weakref.ref, model.modules()), *map(weakref.ref, model.parameters())]
    if route == "fx":
        model = velora_fx.transform(fx.symbolic_trace(model), CFG)
        step = model
        refs.append(weakref.ref(model))
    else:
        if prepared:
            velora_fx.prepare(model)
        step = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        step(torch.randn(2, 4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(velora_fx.report(model).compressed) == 2
    return refs


@pytest.mark.parametrize("route,prepared", [("backend", True), ("backend", False), ("fx", True)])
def test_a_model_trained_in_a_function_is_freed(route, prepared, shared_backend):
    """No ``torch._dynamo.reset()``: the compiled graph outlives the model (Dynamo's cache), velora_fx's runtime
    must not keep the model, a submodule or a parameter alive through it."""
    refs = _train_in_a_function(route, prepared, shared_backend)
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, [type(a).__name__ for a in alive]


def test_velora_tables_do_not_grow_per_model(shared_backend):
    def sizes():
        gc.collect()
        return len(state._CONTAINERS), len(state._DETACHED), len(runtime._RECORDS)

    _train_in_a_function("backend", True, shared_backend)
    _train_in_a_function("backend", False, shared_backend)
    first = sizes()
    for _ in range(3):
        _train_in_a_function("backend", True, shared_backend)
        _train_in_a_function("backend", False, shared_backend)
    assert sizes() == first


# -- one rule for eval() with grad ---------------------------------------------------------------------------


def test_eval_with_grad_compresses_in_both_routes(shared_backend):
    x = torch.randn(3, 4, 16)
    compiled_model = velora_fx.prepare(_tiny(11)).eval()
    saved_bytes_step(torch.compile(compiled_model, backend=shared_backend), x)
    gm = velora_fx.transform(fx.symbolic_trace(_tiny(11)), CFG).eval()
    saved_bytes_step(gm, x)
    eager = _tiny(11).eval()
    seen, _ = capture_linears(eager)
    saved_bytes_step(eager, x)
    assert {r.weight for r in velora_fx.report(compiled_model).compressed} == {"fc1.weight", "fc2.weight"}
    assert {r.weight for r in velora_fx.report(gm).compressed} == {"fc1.weight", "fc2.weight"}
    for route in (compiled_model, gm):
        for name in ("fc1", "fc2"):
            v = directions(route)[f"{name}.weight"]
            assert_close(grads(route)[f"{name}.weight"], velora_dw_of(seen[name], v), name)


def velora_dw_of(rec, v):
    return velora_dw(rec["x"], rec["g"], v, 1.0)


# -- per-block compile ---------------------------------------------------------------------------------------


def _compile_per_block(model: LlamaStack, style: str, backend) -> None:
    for i, layer in enumerate(model.layers):
        if style == "replace":  # torchtitan's apply_compile: the compiled block registered in place of the block
            model.layers.register_module(str(i), torch.compile(layer, backend=backend))
        else:  # nn.Module.compile: the block compiles its own __call__
            layer.compile(backend=backend)


@pytest.mark.parametrize("prepared", [True, False])
@pytest.mark.parametrize("style", ["replace", "module.compile"])
def test_per_block_compile_reports_every_site_once_under_model_names(style, prepared):
    torch.manual_seed(12)
    model = LlamaStack(blocks=2, dim=16, heads=2, hidden=24)
    eager = copy.deepcopy(model)
    if prepared:
        velora_fx.prepare(model)
    _compile_per_block(model, style, velora_fx.make_backend(CFG))
    x = torch.randn(2, 6, 16)
    saved_bytes_step(model, x)
    rep = velora_fx.report(model)
    names = {n.replace("._orig_mod", "") for n, p in model.named_parameters() if p.dim() == 2}
    assert sorted(r.weight for r in rep) == sorted(names), str(rep)  # once each, as the model names them
    assert {r.weight for r in rep.compressed} == {n for n in names if "o_proj" not in n}
    if prepared:
        assert state_keys(model) == {f"velora_fx.{r.weight}.v" for r in rep.compressed}
    seen, _ = capture_linears(eager)
    saved_bytes_step(eager, x)
    vs, got = directions(model), grads(model)
    for r in rep.compressed:
        module = r.weight[: -len(".weight")]
        assert_close(got[r.weight], velora_dw_of(seen[module], vs[r.weight]), r.weight)
