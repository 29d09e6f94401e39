"""What a new user does on day one, reproduced: save with safetensors, meta-device init, a backend built per model,
a checkpoint that must not resume wrong (issue "day one in a real training stack")."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import velora_fx
from velora_fx import Quantized, VeloraConfig

from .backend_models import LlamaStack
from .helpers import saved_bytes_step


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def trained():
    """A prepared 1-block stack after one compiled step: q/k/v (and gate/up) share one input, so one state."""
    torch.manual_seed(0)
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    saved_bytes_step(torch.compile(model, backend=velora_fx.backend), torch.randn(2, 8, 64))
    return model


def test_safetensors_saves_and_loads_shared_projections(trained, tmp_path):
    state = trained.state_dict()
    q, k = "velora_fx.layers.0.self_attn.q_proj.weight.v", "velora_fx.layers.0.self_attn.k_proj.weight.v"
    assert torch.equal(state[q], state[k])  # one basis per input: equal values ...
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))  # ... but no shared storage: safetensors refused it
    fresh = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    fresh.load_state_dict(load_file(str(path)))
    got = velora_fx.projections(fresh)
    for name, proj in velora_fx.projections(trained).items():
        assert torch.equal(got[name].basis, proj.basis) and got[name].calibrated, name


def test_meta_device_then_to_empty_starts_afresh_and_loads(trained):
    model = copy.deepcopy(trained)
    model.to("meta")
    assert all(p.basis.device.type == "meta" for p in velora_fx.projections(model).values())
    model.to_empty(device="cpu")  # raised "Cannot copy out of meta tensor"
    projs = velora_fx.projections(model)
    assert projs and all(not p.calibrated and p.basis.device.type == "cpu" for p in projs.values())
    model.load_state_dict(trained.state_dict())  # the usual next step: weights and projections back
    for name, proj in velora_fx.projections(trained).items():
        assert torch.equal(projs[name].basis, proj.basis), name


def test_a_non_finite_basis_in_a_checkpoint_is_an_error_naming_its_key(trained):
    state = trained.state_dict()
    key = "velora_fx.layers.0.mlp.down_proj.weight.v"
    state[key] = state[key].clone()
    state[key][0] = float("nan")
    fresh = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    with pytest.raises(RuntimeError, match=rf"{key} holds NaN or inf"):
        fresh.load_state_dict(state)


def test_a_backend_built_per_model_compresses_every_model():
    """Each ``make_backend(cfg)`` call used to be a new backend: from the 9th model on, Dynamo's recompile limit ran
    the frame without velora_fx, silently. Equal configs now share one backend (and one compiled graph)."""
    cfg = VeloraConfig(estimator=Quantized(bits=4))
    assert velora_fx.make_backend(cfg) is velora_fx.make_backend(VeloraConfig(estimator=Quantized(bits=4)))
    assert velora_fx.make_backend(cfg) is not velora_fx.make_backend(VeloraConfig(estimator=Quantized(bits=2)))
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 8  # Dynamo's default (the test session raises it)
    try:
        for i in range(12):
            torch.manual_seed(i)
            model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
            saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(cfg)), torch.randn(4, 32))
            assert len(velora_fx.report(model).compressed) == 2, f"model {i}"
    finally:
        torch._dynamo.config.recompile_limit = limit
