"""The weight-gradient estimators (``velora_fx/estimators.py``): each is its formula, in both routes; the random ones
are unbiased and the fixed ones are not; the principal basis is the top eigenvectors; refreshes move the basis
without recompiling; a run resumed across a refresh is bit-identical.
"""

from __future__ import annotations

import copy
import io
import math

import warnings

import pytest
import torch
from torch import fx

import velora_fx
from velora_fx import Principal, PrincipalRandom, VeloraConfig, ops
from velora_fx.config import ESTIMATORS
from velora_fx.estimators import for_config

from .backend_models import LlamaStack
from .helpers import assert_close, capture_linears, directions, grads, saved_bytes_step
from .models import LlamaBlock

TOKEN_ESTIMATORS = ("random", "principal", "principal_random")


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _structured(n: int, d: int, seed: int = 0, decay: float = 0.7) -> torch.Tensor:
    """Rows whose energy decays over directions, as real activations' does (a spectrum ~ decay^i)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = decay ** torch.arange(d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.t() + 0.1


def _formula(x: torch.Tensor, g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``gᵀ x̂`` with ``x̂ = reconstruct(project(x, B), B)``: the estimator's weight gradient, in float64."""
    x, g, basis = x.double(), g.double(), basis.double()
    x_hat = ops.reconstruct(ops.project(x, basis), basis, x.shape[-1]).reshape(-1, x.shape[-1])
    return g.reshape(-1, g.shape[-1]).t() @ x_hat


# -- each estimator is its formula, compiled and FX ------------------------------------------------------------


@pytest.mark.parametrize("estimator", TOKEN_ESTIMATORS)
def test_compiled_dw_is_the_estimators_formula(estimator):
    torch.manual_seed(1)
    cfg = VeloraConfig(estimator=ESTIMATORS[estimator](rank=8, refresh_every=2), scale=0.5)
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=32, heads=2, hidden=48))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=velora_fx.make_backend(cfg))
    seen, _ = capture_linears(eager)
    for step in range(3):  # a refresh at the third step
        x = torch.randn(2, 8, 32) + 0.2 * step
        for p in [*model.parameters(), *eager.parameters()]:
            p.grad = None
        saved_bytes_step(compiled, x)
        saved_bytes_step(eager, x)
    rep = velora_fx.report(model)
    assert {r.estimator for r in rep.compressed} == {estimator} and all(r.per_token == 8 for r in rep.compressed)
    assert all(r.last_refresh == 2 for r in rep.compressed)
    bases, got = directions(model), grads(model)
    assert len(rep.compressed) == 6
    for r in rep.compressed:
        module = r.weight[: -len(".weight")]
        basis = bases[r.weight]
        assert basis.shape == (r.input_shape[-1], 8)
        assert_close(got[r.weight].double(), 0.5 * _formula(seen[module]["x"], seen[module]["g"], basis), r.weight)
    exact = copy.deepcopy(eager)  # the weights VeLoRA does not touch stay exact: o_proj, norms
    for p in exact.parameters():
        p.grad = None
    for n in ("layers.0.self_attn.o_proj.weight", "norm.weight"):
        assert n in got


@pytest.mark.parametrize("estimator", TOKEN_ESTIMATORS)
def test_fx_route_dw_is_the_estimators_formula(estimator):
    torch.manual_seed(2)
    cfg = VeloraConfig(estimator=ESTIMATORS[estimator](rank=8, refresh_every=2))
    block = LlamaBlock(dim=32, heads=2, hidden=48)
    gm = velora_fx.transform(fx.symbolic_trace(copy.deepcopy(block)), cfg)
    eager = copy.deepcopy(block)
    seen, _ = capture_linears(eager)
    for step in range(3):
        x = torch.randn(2, 8, 32) + 0.2 * step
        for p in [*gm.parameters(), *eager.parameters()]:
            p.grad = None
        saved_bytes_step(gm, x)
        saved_bytes_step(eager, x)
    bases, got = directions(gm), grads(gm)
    rep = velora_fx.report(gm)
    assert len(rep.compressed) == 7 and all(r.estimator == estimator for r in rep.compressed)
    assert all(r.last_refresh == 2 for r in rep.compressed)
    for r in rep.compressed:
        module = r.weight[: -len(".weight")]
        assert_close(got[r.weight].double(), _formula(seen[module]["x"], seen[module]["g"], bases[r.weight]), r.weight)


# -- bias and variance --------------------------------------------------------------------------------------------


def _reseeded(estimator: str, x: torch.Tensor, rank: int, index: int) -> torch.Tensor:
    """The basis of re-seed ``index`` (principal parts calibrated on ``x`` and kept, random parts re-drawn)."""
    cfg = VeloraConfig(estimator=ESTIMATORS[estimator](rank=rank))
    est = for_config(cfg)
    shape, _ = est.basis_shape(x.shape[-1])
    total, count = est.statistics(x, shape)
    basis = est.calibrated(total, count, "w", shape) if estimator != "random" else est.initial(shape, "w")[0]
    return basis if index == 0 else est.refreshed(basis, None, 0, "w", index)


@pytest.mark.parametrize("estimator", ["random", "principal_random"])
def test_random_estimators_are_unbiased(estimator):
    """The mean of ``M`` re-seeded estimates converges to the exact ``dW``: its error is within 4 standard errors
    (``4 · rms error / √M``) of zero, while a single estimate's error is far larger."""
    x = _structured(256, 24)
    g = torch.randn(256, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = g.t() @ x
    m = 400
    estimates = torch.stack([_formula(x, g, _reseeded(estimator, x.float(), 8, i)) for i in range(m)])
    errors = (estimates - exact).flatten(1).norm(dim=1)
    rms = float(errors.pow(2).mean().sqrt())
    mean_error = float((estimates.mean(0) - exact).norm())
    assert mean_error <= 4 * rms / math.sqrt(m), (mean_error, rms)
    assert rms > 10 * mean_error  # one estimate alone is far off: the test has something to average


def test_principal_random_has_less_variance_than_random_on_concentrated_inputs():
    x = _structured(256, 24, decay=0.6)
    g = torch.randn(256, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = g.t() @ x
    rms = {}
    for estimator in ("random", "principal_random"):
        errors = [float((_formula(x, g, _reseeded(estimator, x.float(), 8, i)) - exact).norm()) for i in range(50)]
        rms[estimator] = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert rms["principal_random"] < 0.5 * rms["random"], rms


@pytest.mark.parametrize("estimator", ["principal", "velora"])
def test_fixed_subspace_estimators_are_biased(estimator):
    """The contrast: a fixed orthogonal projection does not average out (its mean over 'seeds' is itself)."""
    x = _structured(256, 24)
    g = torch.randn(256, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = g.t() @ x
    if estimator == "velora":
        basis = ops.initial_direction(x.float(), 3, "w")  # 8 groups of 3
    else:
        basis = _reseeded("principal", x.float(), 8, 0)
    error = float((_formula(x, g, basis) - exact).norm() / exact.norm())
    assert error > 0.05


# -- the principal basis ------------------------------------------------------------------------------------------


def test_principal_basis_is_orthonormal_and_spans_the_top_eigenvectors():
    x = _structured(512, 24, seed=6)
    basis = _reseeded("principal", x.float(), 6, 0).double()
    torch.testing.assert_close(basis.t() @ basis, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    _, vecs = torch.linalg.eigh(x.t() @ x)
    top = vecs[:, -6:]
    # the same subspace: projecting the top eigenvectors onto the basis loses nothing
    torch.testing.assert_close((basis @ (basis.t() @ top)), top, atol=1e-4, rtol=0)
    pr = _reseeded("principal_random", x.float(), 6, 0).double()  # 3 principal columns, 3 random in the complement
    torch.testing.assert_close(pr[:, :3], basis[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(pr[:, :3].t() @ pr[:, 3:], torch.zeros(3, 3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(pr[:, 3:].t() @ pr[:, 3:], torch.eye(3, dtype=torch.float64) * (24 - 3) / 3,
                               atol=1e-4, rtol=0)  # fmt: skip


def test_principal_refresh_follows_a_moving_subspace_smoothly():
    est = for_config(VeloraConfig(estimator=Principal(rank=4, refresh_decay=0.5)))
    a, b = _structured(512, 16, seed=7), _structured(512, 16, seed=8)
    shape, _ = est.basis_shape(16)
    u = est.calibrated(*est.statistics(a.float(), shape), "w", shape)
    distance = lambda p, q: float(torch.linalg.matrix_norm(p @ p.t() - q @ q.t()))  # noqa: E731
    target = est.calibrated(*est.statistics(b.float(), shape), "w", shape)
    steps = [u]
    for i in range(12):
        total, count = est.refresh_statistics(b.float(), steps[-1])
        steps.append(est.refreshed(steps[-1], total, count, "w", i + 1))
    moves = [distance(p, q) for p, q in zip(steps, steps[1:])]
    assert distance(steps[-1], target) < 0.1 * distance(u, target)  # it got there
    assert max(moves) < 0.75 * distance(u, target)  # not in one jump


# -- refresh in a compiled model, and resuming across it ----------------------------------------------------------


@pytest.mark.parametrize("estimator", ["random", "principal_random"])
def test_refresh_changes_the_basis_without_recompiling(estimator):
    calls = []

    def counting(gm, example_inputs, **kwargs):
        calls.append(1)
        return backend(gm, example_inputs, **kwargs)

    backend = velora_fx.make_backend(VeloraConfig(estimator=ESTIMATORS[estimator](rank=8, refresh_every=2)))
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=32, heads=2, hidden=48))
    compiled = torch.compile(model, backend=counting)
    history = []
    for _ in range(5):
        saved_bytes_step(compiled, torch.randn(2, 8, 32))
        history.append(directions(model)["layers.0.mlp.down_proj.weight"])
    assert len(calls) == 1
    changed = [not torch.equal(a, b) for a, b in zip(history, history[1:])]
    assert changed == [False, True, False, True]  # refreshed at steps 2 and 4
    assert velora_fx.projections(model)["layers.0.mlp.down_proj.weight"].steps == 5


def test_resume_across_a_refresh_is_bit_identical():
    cfg = VeloraConfig(estimator=PrincipalRandom(rank=8, refresh_every=2))
    backend = velora_fx.make_backend(cfg)
    torch.manual_seed(9)
    initial = LlamaStack(blocks=1, dim=32, heads=2, hidden=48)
    batches = [torch.randn(2, 8, 32) for _ in range(6)]

    def make():
        model = velora_fx.prepare(copy.deepcopy(initial))
        return model, torch.compile(model, backend=backend), torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(compiled, opt, x):
        opt.zero_grad()
        compiled(x).pow(2).mean().backward()
        opt.step()

    model, compiled, opt = make()
    for x in batches[:3]:
        step(compiled, opt, x)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert model.state_dict()["velora_fx.layers.0.mlp.down_proj.weight.step"] == 3
    for x in batches[3:]:  # refreshes at step 4
        step(compiled, opt, x)

    resumed, compiled2, opt2 = make()
    state = torch.load(io.BytesIO(buf.getvalue()))
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    for x in batches[3:]:
        step(compiled2, opt2, x)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(estimator="svd"), r"estimator must be Velora\(...\), RandomProjection"),
        (dict(rank=8), "rank is a field of RandomProjection and Principal and PrincipalRandom, not of Velora"),
        (dict(estimator="random", init="ema"), r"init is a field of Velora, not of RandomProjection \(estimator='random'\)"),
        (dict(estimator="random", sub_token_size=8, num_groups=None), "sub_token_size is a field of Velora, not of Random"),
        (dict(estimator="principal_random", rank=8, random_rank=8), "both at least 1"),
        (dict(estimator="random", random_rank=2), "random_rank is a field of PrincipalRandom, not of RandomProjection"),
        (dict(refresh_every=-1), "refresh_every must be an int >= 0"),
        (dict(init="ema", refresh_every=10), "already refreshes v every step"),
        (dict(estimator="principal", refresh_decay=1.0), "refresh_decay must be in"),
    ],
)
def test_estimator_config_errors_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 0.2's spelling, on purpose
        VeloraConfig(**kwargs)


def test_token_estimators_default_to_velora_bytes_and_round_trip():
    with pytest.warns(DeprecationWarning, match=r"estimator=velora_fx.PrincipalRandom\(rank=16\)"):  # 0.2's spelling
        cfg = VeloraConfig(estimator="principal_random", num_groups=16)
    assert (cfg.rank, cfg.random_rank) == (16, 8)
    assert VeloraConfig.from_dict(cfg.to_dict()) == cfg
    est = for_config(cfg)
    assert est.basis_shape(384) == ((384, 16), "")
    assert est.basis_shape(16)[0] is None and "not larger than rank 16" in est.basis_shape(16)[1]
