"""velora_fx.backend on bad input, faults and misuse: every unsupported case is loud and safe.

Each case either stays exact (and the report says why), or raises an error that names the layer and says
what to do. Never a silent wrong gradient. Invalid config values are tested in tests/test_config.py; the
FX route's calibration faults in tests/test_fx_transform.py.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from torch import nn

import velora_fx
from velora_fx import Velora, VeloraConfig
from velora_fx.report import COMPRESSED, SKIPPED

from .backend_models import TinyMLP
from .helpers import assert_close, capture_linears, directions, grads, saved_bytes_step, velora_dw

CFG = VeloraConfig(estimator=Velora(num_groups=8))


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    """TinyMLP is compiled by many backends in this session: start this module below Dynamo's recompile limit
    (past it Dynamo runs the frame eagerly, without any backend)."""
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def shared_backend():
    """One backend for the TinyMLP cases: Dynamo compiles TinyMLP once and reuses the graph for every instance."""
    return velora_fx.make_backend(CFG)


def _fresh(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(dim=32, hidden=48)


# -- sizes ------------------------------------------------------------------------------------------------


def test_num_groups_larger_than_features_stays_exact_and_non_dividing_sizes_are_padded():
    torch.manual_seed(1)
    model = TinyMLP(dim=30, hidden=45)  # fc1: D=30 < 32 groups; fc2: D=45 -> d=2, 23 sub-tokens, last one padded
    initial = copy.deepcopy(model)
    x = torch.randn(2, 6, 30)
    cfg = VeloraConfig(estimator=Velora(num_groups=32))
    loss, _ = saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(cfg)), x)
    eager = copy.deepcopy(initial)
    seen, _ = capture_linears(eager)
    eager_loss, _ = saved_bytes_step(eager, x)
    assert_close(loss, eager_loss, "loss")
    by = {r.weight: r for r in velora_fx.report(model)}
    assert by["fc1.weight"].status == SKIPPED
    assert by["fc1.weight"].reason == (
        "feature size 30 is smaller than num_groups 32; use a smaller num_groups (or exclude this weight) to compress it"
    )
    assert by["fc2.weight"].status == COMPRESSED and by["fc2.weight"].sub_token_size == 2
    assert set(directions(model)) == {"fc2.weight"}  # no v for the exact layer
    got, ref = grads(model), grads(eager)
    for n in ("fc1.weight", "fc1.bias", "fc2.bias"):
        assert_close(got[n], ref[n], n)
    v = directions(model)["fc2.weight"]
    assert_close(got["fc2.weight"], velora_dw(seen["fc2"]["x"], seen["fc2"]["g"], v, 1.0), "fc2.weight")


def test_sub_token_size_one_is_not_compressed():
    """num_groups == D gives d = 1: p would be as large as X. Left exact, with the reason (as the FX route)."""
    model = _fresh(2)
    x = torch.randn(2, 4, 32)
    saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=32)))), x)
    by = {r.weight: r for r in velora_fx.report(model)}
    assert by["fc1.weight"].status == SKIPPED and "sub-token size 1" in by["fc1.weight"].reason, by["fc1.weight"]
    assert by["fc2.weight"].status == COMPRESSED  # D=48 -> d=2
    assert "fc1.weight" not in directions(model)


# -- calibration faults (through the backend) ---------------------------------------------------------------


def test_all_zero_first_batch_uses_uniform_direction_and_warns(shared_backend, caplog):
    model = _fresh(3)
    compiled = torch.compile(model, backend=shared_backend)
    with caplog.at_level(logging.WARNING, logger="velora_fx"):
        saved_bytes_step(compiled, torch.zeros(2, 5, 32))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "fc1.weight" in warned and "average to zero" in warned and "uniform direction" in warned
    v = directions(model)["fc1.weight"]
    assert torch.allclose(v, torch.full_like(v, 1 / math.sqrt(v.numel())))
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_nan_first_batch_raises_naming_the_layer_and_leaves_no_nan_v(shared_backend):
    model = _fresh(4)
    compiled = torch.compile(model, backend=shared_backend)
    x = torch.randn(2, 5, 32)
    x[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch of fc1\.weight holds NaN or inf.*velora_fx\.calibrate"):
        compiled(x)
    x[0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"fc1\.weight holds NaN or inf"):
        compiled(x)
    assert all(torch.isfinite(v).all() and not v.any() for v in directions(model).values())  # uncalibrated, not NaN
    x[0, 1, 3] = 0.0
    saved_bytes_step(compiled, x)  # a finite batch calibrates as usual
    assert all(torch.isfinite(v).all() and v.any() for v in directions(model).values())
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_empty_batch_does_not_calibrate(shared_backend, caplog):
    """0 tokens: nothing to average. v stays uncalibrated (dW of an empty batch is 0 either way: exact); the
    first non-empty batch calibrates it."""
    model = _fresh(5)
    compiled = torch.compile(model, backend=shared_backend)
    with caplog.at_level(logging.WARNING, logger="velora_fx"):
        out = compiled(torch.randn(0, 5, 32))
        out.sum().backward()
    assert out.shape == (0, 5, 32)
    assert not [r for r in caplog.records if "average to zero" in r.getMessage()]
    assert all(not v.any() for v in directions(model).values())
    assert all(not g.any() for g in grads(model).values())
    x = torch.randn(2, 5, 32)
    eager = copy.deepcopy(model)
    seen, _ = capture_linears(eager)
    saved_bytes_step(compiled, x)
    saved_bytes_step(eager, x)
    v = directions(model)["fc2.weight"]
    assert v.any()
    assert_close(model.fc2.weight.grad, velora_dw(seen["fc2"]["x"], seen["fc2"]["g"], v, 1.0), "fc2.weight")


# -- what the backend cannot do ---------------------------------------------------------------------------


def test_double_backward_is_refused(shared_backend):
    """create_graph=True through any AOTAutograd-compiled graph is refused by torch itself: no wrong 2nd derivative."""
    compiled = torch.compile(_fresh(6), backend=shared_backend)
    x = torch.randn(2, 5, 32, requires_grad=True)
    # which of torch's two refusals comes first depends on donated buffers; both are RuntimeErrors
    with pytest.raises(RuntimeError, match="does not currently support double backward|requires create_graph=False"):
        (gx,) = torch.autograd.grad(compiled(x).pow(2).sum(), x, create_graph=True)
        gx.sum().backward()


def test_complex_weights_stay_exact():
    torch.manual_seed(7)
    model = nn.Linear(32, 16, dtype=torch.cfloat)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 32, dtype=torch.cfloat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Inductor: no code generation for complex operators
        torch.compile(model, backend=velora_fx.make_backend(CFG))(x).abs().sum().backward()
    eager(x).abs().sum().backward()
    (r,) = velora_fx.report(model)
    assert r.status == SKIPPED and "complex" in r.reason, r
    assert not directions(model)
    for n, g in grads(eager).items():
        torch.testing.assert_close(grads(model)[n], g, rtol=1e-4, atol=1e-5)


class IntTokens(nn.Module):
    """Integer inputs: token ids embedded, and an integer count cast to float before a linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 32)
        self.fc = nn.Linear(32, 16)

    def forward(self, ids, counts):
        return self.fc(self.embed(ids) * counts.unsqueeze(-1).float())


def test_integer_inputs():
    torch.manual_seed(8)
    model = IntTokens()
    eager = copy.deepcopy(model)
    ids, counts = torch.randint(0, 20, (2, 6)), torch.randint(1, 4, (2, 6), dtype=torch.int32)
    loss, _ = saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(CFG)), ids, counts)
    eager_loss, _ = saved_bytes_step(eager, ids, counts)
    assert_close(loss, eager_loss, "loss")
    by = {r.weight: r for r in velora_fx.report(model)}
    assert by["fc.weight"].status == COMPRESSED
    for n in ("embed.weight", "fc.bias"):
        assert_close(grads(model)[n], grads(eager)[n], n)


def test_model_without_linear_layers():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.GELU(), nn.LayerNorm(6))
    default_model = copy.deepcopy(model)
    x = torch.randn(2, 4, 8)
    loss, _ = saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(CFG)), x)
    default_loss, _ = saved_bytes_step(torch.compile(default_model), x)
    assert_close(loss, default_loss, "loss")
    assert len(velora_fx.report(model)) == 0 and not directions(model)
    for n, g in grads(default_model).items():
        assert_close(grads(model)[n], g, n)


def test_backend_used_only_for_inference(shared_backend):
    model = _fresh(10).eval()
    compiled = torch.compile(model, backend=shared_backend)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        out = compiled(x)
    with torch.no_grad():
        out2 = compiled(x)
    want = copy.deepcopy(model)(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2, want, rtol=1e-5, atol=1e-6)
    assert not directions(model) and len(velora_fx.report(model)) == 0


# -- misuse: configs and checkpoints that do not match ---------------------------------------------------------


def test_recompiling_with_another_config_is_a_clear_error(shared_backend):
    model = velora_fx.prepare(_fresh(11))
    saved_bytes_step(torch.compile(model, backend=shared_backend), torch.randn(2, 5, 32))
    assert directions(model)["fc1.weight"].shape == (4,)
    other = torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=4))))
    with pytest.raises(ValueError, match=r"the projection of fc1\.weight \(velora_fx\.fc1\.weight\.v\) has shape \(4,\) "
                                         r"but this backend's config needs \(8,\) for D=32; compile with the config the "
                                         r"model was trained with"):  # fmt: skip
        other(torch.randn(2, 5, 32))
    # the same sizes under another config (scale) is accepted: v is kept, only the scale changes
    before = directions(model)
    saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8), scale=0.5))),
                     torch.randn(2, 5, 32))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in directions(model).items())


def test_one_backend_two_configs_never_share_a_graph():
    """The config belongs to the backend object, which Dynamo keys compiled graphs on: two instances of one class
    compiled with two configs each run their own graph (a config kept on the model could be ignored on reuse)."""
    x = torch.randn(2, 5, 32)
    a, b = velora_fx.prepare(_fresh(14)), velora_fx.prepare(_fresh(14))
    saved_bytes_step(torch.compile(a, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=8)))), x)
    saved_bytes_step(torch.compile(b, backend=velora_fx.make_backend(VeloraConfig(estimator=Velora(num_groups=4)))), x)
    assert directions(a)["fc1.weight"].shape == (4,) and directions(b)["fc1.weight"].shape == (8,)


def test_loading_v_of_another_shape_is_a_clear_error(shared_backend):
    trained = velora_fx.prepare(_fresh(12))
    saved_bytes_step(torch.compile(trained, backend=shared_backend), torch.randn(2, 5, 32))
    state = trained.state_dict()
    bad = dict(state, **{"velora_fx.fc1.weight.v": torch.ones(5) / math.sqrt(5)})
    # a model that already has its projections: torch's size-mismatch error names the key
    with pytest.raises(RuntimeError, match=r"size mismatch for velora_fx\.fc1\.weight\.v"):
        trained.load_state_dict(bad)
    # a fresh model: the loaded v is taken as it is, and the first compiled call refuses it, naming the layer
    fresh = velora_fx.prepare(_fresh(13))
    fresh.load_state_dict(bad)
    compiled = torch.compile(fresh, backend=shared_backend)
    with pytest.raises(ValueError, match=r"projection of fc1\.weight \(velora_fx\.fc1\.weight\.v\) has shape \(5,\) "
                                         r"but this backend's config needs \(4,\)"):  # fmt: skip
        compiled(torch.randn(2, 5, 32))
