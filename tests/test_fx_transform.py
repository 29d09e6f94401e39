"""The FX route: graph structure, numerics against an untouched copy, state, compile."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

import velora_fx
from velora_fx import Velora, VeloraConfig, ops

from .capture import reference_step, velora_dw
from .models import MLP, FunctionalNet, LlamaBlock, LlamaStack

MODELS = {
    "mlp": (lambda: MLP(), lambda: torch.randn(3, 10, 64)),
    "llama_block": (lambda: LlamaBlock(), lambda: torch.randn(2, 16, 64)),
    "functional": (lambda: FunctionalNet(), lambda: torch.randn(4, 7, 48)),
}


def _transformed(model, config):
    return velora_fx.transform(fx.symbolic_trace(copy.deepcopy(model)), config)


def _loss(out):
    return out.float().pow(2).mean()


def _check_against_reference(model, x, config, atol=1e-5, rtol=1e-4, lossy=True):
    """One training step of transform(model) against an untouched copy: everything the issue names."""
    gm = _transformed(model, config)
    ref, ref_out, (ref_x,), seen = reference_step(model, x)
    x = x.detach().requires_grad_()
    out = gm(x)
    _loss(out).backward()

    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # forward: the same ops
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)  # dx exact

    rep = velora_fx.report(gm)
    compressed = {r.node: r for r in rep.compressed}
    assert compressed, "nothing was compressed"
    projections = velora_fx.projections(gm)
    expected = {}
    for node, rec in compressed.items():
        v = projections[rec.weight].v
        assert v.shape == (rec.sub_token_size,)
        # the first training batch calibrated v to the mean direction of the site's sub-tokens
        if config.init == "batch_average_once":
            torch.testing.assert_close(v, ops.initial_direction(seen[node].x, rec.sub_token_size, node))
        dw = velora_dw(seen[node], v, config.scale)
        expected[rec.weight] = expected.get(rec.weight, 0) + dw
    assert set(expected) <= set(projections)

    got = dict(gm.named_parameters())
    for name, p_ref in ref.named_parameters():
        p = got[name]
        if p_ref.grad is None:
            assert p.grad is None, name
        elif name in expected:
            torch.testing.assert_close(p.grad.double(), expected[name], atol=atol, rtol=rtol, msg=name)
            if lossy:
                assert not torch.allclose(p.grad, p_ref.grad), f"{name}: dW is exact, so nothing was compressed"
        else:  # uncompressed parameters (biases, norms, embeddings, skipped weights): exact
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=0, msg=name)
    return gm


#: per-weight sizes: ``v_proj`` apart from the ``q_proj`` / ``k_proj`` it shares its input with
OVERRIDES = VeloraConfig(estimator=Velora(num_groups=8), scale=0.5,
                         overrides={"v_proj.weight": Velora(num_groups=4), "down_*": Velora(sub_token_size=16)})  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("config", [VeloraConfig(estimator=Velora(num_groups=8)), VeloraConfig(estimator=Velora(sub_token_size=12), scale=0.1),
                                    OVERRIDES], ids=["g8", "d12-scale0.1", "overrides"])  # fmt: skip
def test_training_step_matches_reference(name, config):
    make_model, make_x = MODELS[name]
    _check_against_reference(make_model(), make_x(), config)


def test_overrides_give_weights_their_own_sub_tokens_and_bases():
    gm = _check_against_reference(LlamaBlock(), MODELS["llama_block"][1](), OVERRIDES)
    sizes = {r.weight: r.sub_token_size for r in velora_fx.report(gm).compressed}
    assert sizes == {"q_proj.weight": 8, "k_proj.weight": 8, "v_proj.weight": 16, "o_proj.weight": 8,
                     "gate_proj.weight": 8, "up_proj.weight": 8, "down_proj.weight": 16}  # fmt: skip
    projs = velora_fx.projections(gm)
    assert projs["k_proj.weight"].root is projs["q_proj.weight"].root  # one v per input and size
    assert projs["v_proj.weight"].root is not projs["q_proj.weight"].root


def test_llama_stack_tokens_and_tied_head():
    model = LlamaStack(layers=2)
    tokens = torch.randint(0, 97, (2, 12))
    gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=16)))
    ref, ref_out, _, seen = reference_step(model, tokens)
    out = gm(tokens)
    _loss(out).backward()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    emb = dict(gm.named_parameters())["embed.weight"]
    torch.testing.assert_close(emb.grad, ref.embed.weight.grad, rtol=0, atol=0)
    # the lm_head input is the final norm's output; every linear is a site
    assert {r.weight for r in velora_fx.report(gm).compressed} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight"
    }


def test_graph_structure_and_idempotence():
    gm = _transformed(FunctionalNet(), VeloraConfig(estimator=Velora(num_groups=8)))
    sites = [n for n in gm.graph.nodes if n.target is velora_fx.fx.linear]
    assert [n.kwargs["name"] for n in sites] == ["w1", "w2", "w3", "w4"]
    assert all(n.args[0].op == "get_attr" and n.args[0].target == "velora_fx" for n in sites)  # the model's state
    # each input is read by one site here: one projection each, computed from that site's input
    projects = [n for n in gm.graph.nodes if n.target is velora_fx.fx.project]
    assert [n.kwargs["name"] for n in projects] == ["w1", "w2", "w3", "w4"]
    assert all(site.args[2] is proj and site.args[1] is proj.args[1] for site, proj in zip(sites, projects))
    # the transposes of w3 / w4 were only used by their matmul: gone
    assert not [n for n in gm.graph.nodes if n.op in ("call_method", "call_function") and
                (n.target in ("t",) or n.target is getattr)]
    rep = velora_fx.report(gm)
    assert [(r.weight, r.status) for r in rep] == [
        ("w1", "compressed"), ("w2", "compressed"), ("w3", "compressed"), ("w4", "compressed"), ("frozen", "skipped")
    ]
    assert "frozen weight" in rep.skipped[0].reason
    code = gm.code
    result = velora_fx.fx.linear_pass(gm, VeloraConfig(estimator=Velora(num_groups=8)))
    assert not result.modified and gm.code == code
    assert velora_fx.transform(gm, VeloraConfig(estimator=Velora(num_groups=8))) is gm
    assert [(r.weight, r.status) for r in velora_fx.report(gm)] == [(r.weight, r.status) for r in rep]  # not doubled
    with pytest.raises(ValueError, match="already transformed"):
        velora_fx.transform(gm, VeloraConfig(estimator=Velora(num_groups=4)))


def test_skips_are_reported_and_exact():
    model = LlamaBlock()
    config = VeloraConfig(estimator=Velora(num_groups=8), include=("*.v_proj.weight", "*proj.weight"), exclude=("q_proj.*",))
    model.k_proj.weight.requires_grad_(False)
    gm = _check_against_reference(model, torch.randn(2, 8, 64), config)
    reasons = {r.weight: r.reason for r in velora_fx.report(gm).skipped}
    assert reasons["q_proj.weight"] == "excluded by pattern 'q_proj.*'"
    assert reasons["k_proj.weight"].startswith("frozen weight")
    # v_proj reads q_proj's input, which stays exact (so the input is kept anyway): one rule with the backend
    assert reasons["v_proj.weight"] == "the input is shared with q_proj.weight, which stays exact (excluded by pattern 'q_proj.*')"
    assert {r.weight for r in velora_fx.report(gm).compressed} == {
        "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"}

    tiny = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 8))
    rep = velora_fx.report(_transformed(tiny, VeloraConfig(estimator=Velora(num_groups=8))))
    assert [r.status for r in rep] == ["skipped", "compressed", "compressed"]
    assert "feature size 4 is smaller than num_groups 8" in rep[0].reason


def test_min_saved_bytes_keeps_small_inputs_exact():
    model = MLP()
    x = torch.randn(2, 3, 64)  # fc1 input: 2*3*64*4 = 1536 bytes; fc2/head inputs 3072
    gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=8), min_saved_bytes=2000))
    ref, _, _, _ = reference_step(model, x)
    _loss(gm(x)).backward()
    torch.testing.assert_close(gm.fc1.weight.grad, ref.fc1.weight.grad, rtol=0, atol=0)
    assert not torch.allclose(gm.fc2.weight.grad, ref.fc2.weight.grad)
    rep = {r.node: r for r in velora_fx.report(gm)}
    assert rep["fc1"].status == "skipped" and "min_saved_bytes" in rep["fc1"].reason
    assert rep["fc2"].status == "compressed" and rep["fc2"].bytes_after == 2 * 3 * 8 * 4


def test_exact_when_every_sub_token_is_a_positive_multiple_of_one_vector():
    d, groups = 8, 4
    u = torch.randn(d)
    coeff = torch.rand(5, 6, groups) + 0.1
    x = (coeff.unsqueeze(-1) * u).reshape(5, 6, groups * d)
    model = nn.Linear(groups * d, 10)
    gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=groups)))
    ref = copy.deepcopy(model)
    _loss(gm(x)).backward()
    _loss(ref(x)).backward()
    torch.testing.assert_close(velora_fx.projections(gm)["weight"].v, u / u.norm())
    torch.testing.assert_close(gm.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)


def test_compressed_dw_has_rank_one_blocks_along_v():
    model = nn.Linear(40, 24)
    gm = _transformed(model, VeloraConfig(estimator=Velora(sub_token_size=10)))
    _loss(gm(torch.randn(6, 40))).backward()
    v = velora_fx.projections(gm)["weight"].v
    blocks = gm.weight.grad.reshape(24 * 4, 10)  # (rows, sub_token_size)
    torch.testing.assert_close(blocks, torch.outer(blocks @ v, v), rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(blocks) == 1


def _saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during ``fn()``."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("groups", [4, 16, 64])
def test_saved_bytes_of_one_linear(groups):
    n_tokens, features = 512, 256
    model = nn.Linear(features, 128)
    gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=groups)))
    x = torch.randn(4, n_tokens // 4, features)
    velora_fx.calibrate(gm, x)
    before, _ = _saved_bytes(lambda: model(x))
    after, out = _saved_bytes(lambda: gm(x))
    assert before == n_tokens * features * 4
    d = features // groups
    assert after == n_tokens * groups * 4 + d * 4  # p, and v
    rec = velora_fx.report(gm)[0]
    assert (rec.bytes_before, rec.bytes_after) == (before, n_tokens * groups * 4)


def test_no_grad_and_inference_do_no_projection_work(monkeypatch):
    model = LlamaBlock()
    gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=8)))
    x = torch.randn(2, 8, 64)
    calls = []
    monkeypatch.setattr(ops, "project", lambda *a: calls.append(a) or pytest.fail("projected"))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=0)
    assert not calls
    assert all(not p.calibrated for p in velora_fx.projections(gm).values())


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(0)
    model = LlamaStack(layers=1)
    batches = [torch.randint(0, 97, (2, 12)) for _ in range(6)]

    def make():
        gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=8)))
        return gm, torch.optim.AdamW(gm.parameters(), lr=1e-2)

    def step(gm, opt, tokens):
        opt.zero_grad()
        _loss(gm(tokens)).backward()
        opt.step()

    gm, opt = make()
    for t in batches[:3]:
        step(gm, opt, t)
    buf = io.BytesIO()
    torch.save({"model": gm.state_dict(), "opt": opt.state_dict()}, buf)
    for t in batches[3:]:
        step(gm, opt, t)

    resumed, opt2 = make()
    state = torch.load(io.BytesIO(buf.getvalue()))
    assert {k for k in state["model"] if k.startswith("velora_fx.")} == {
        f"velora_fx.{n}.v" for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight"
    }  # the layout of the compile backend
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert all(p.calibrated for p in velora_fx.projections(resumed).values())
    for t in batches[3:]:
        step(resumed, opt2, t)
    for (name, a), b in zip(gm.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_calibrate_explicitly_keeps_rng_and_loaded_v():
    model = MLP()
    gm = _transformed(model, VeloraConfig(estimator=Velora(num_groups=8)))
    x = torch.randn(4, 64)
    state = torch.get_rng_state()
    rep = velora_fx.calibrate(gm, x)
    assert torch.equal(state, torch.get_rng_state())
    assert len(rep.compressed) == 3 and rep.bytes_before == 4 * (64 + 128 + 128) * 4
    v = velora_fx.projections(gm)["fc1.weight"].v.clone()
    torch.testing.assert_close(v, ops.initial_direction(x, 8, "fc1"))
    velora_fx.calibrate(gm, torch.randn(4, 64) + 5)  # already calibrated: unchanged
    assert torch.equal(velora_fx.projections(gm)["fc1.weight"].v, v)
    with pytest.raises(ValueError, match="no site rewritten by velora_fx.transform"):
        velora_fx.calibrate(MLP(), x)


def test_bad_calibration_batches():
    gm = _transformed(nn.Linear(16, 4), VeloraConfig(estimator=Velora(num_groups=4)))
    with pytest.raises(ValueError, match=r"weight 'weight' \(graph node 'linear'\) holds NaN or inf"):
        gm(torch.full((3, 16), float("nan")))
    assert not velora_fx.projections(gm)["weight"].calibrated
    gm(torch.zeros(3, 16)).sum().backward()  # zero mean: uniform direction, not NaN
    torch.testing.assert_close(velora_fx.projections(gm)["weight"].v, torch.full((4,), 0.5))


@pytest.mark.parametrize("init", ["batch_average", "ema", "random"])
def test_other_init_modes(init):
    config = VeloraConfig(estimator=Velora(num_groups=4, init=init, ema_decay=0.5))
    gm = _transformed(nn.Linear(16, 4), config)
    proj = velora_fx.projections(gm)["weight"]
    xs = [torch.randn(5, 16) + i for i in range(3)]
    if init == "random":
        assert proj.calibrated
        torch.testing.assert_close(proj.v, ops.random_direction(4, 0, "weight"))
        torch.testing.assert_close(proj.v.norm(), torch.tensor(1.0))
    start = proj.v.clone()
    expected = None
    for x in xs:
        gm(x).sum().backward()
        mean_dir = F.normalize(ops.sub_token_mean(x, 4), dim=0)
        if init == "batch_average":
            expected = mean_dir
        elif init == "ema":
            expected = mean_dir if expected is None else F.normalize(0.5 * expected + 0.5 * mean_dir, dim=0)
        else:
            expected = start
        torch.testing.assert_close(proj.v, expected)


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    features=st.integers(1, 40),
    out_features=st.integers(1, 9),
    split=st.one_of(st.builds(lambda g: VeloraConfig(estimator=Velora(num_groups=g)), st.integers(1, 12)),
                    st.builds(lambda d: VeloraConfig(estimator=Velora(sub_token_size=d)), st.integers(1, 12))),
    bias=st.booleans(),
    scale=st.sampled_from([1.0, 0.25]),
)
def test_single_linear_any_shape(lead, features, out_features, split, bias, scale):
    config = VeloraConfig(estimator=Velora(num_groups=split.num_groups, sub_token_size=split.sub_token_size), scale=scale)
    model = nn.Linear(features, out_features, bias=bias).double()
    x = torch.randn(*lead, features, dtype=torch.float64) + 0.5
    if config.why_not_splittable(features):
        gm = _transformed(model, config)
        assert velora_fx.report(gm)[0].status == "skipped"
        return
    # a single token with one sub-token per group is its own mean direction: dW may be exact
    _check_against_reference(model, x, config, atol=1e-10, rtol=1e-8, lossy=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    model = MLP().to(dtype)
    x = torch.randn(4, 6, 64, dtype=dtype)
    _check_against_reference(model, x, VeloraConfig(estimator=Velora(num_groups=8)), atol=2e-2, rtol=2e-2)


def test_compiled_fullgraph_after_calibration_no_recompiles():
    gm = _transformed(LlamaBlock(), VeloraConfig(estimator=Velora(num_groups=8)))
    x = torch.randn(2, 16, 64)
    velora_fx.calibrate(gm, x)
    v_before = {k: p.v.clone() for k, p in velora_fx.projections(gm).items()}
    assert len(v_before) == 7
    eager = copy.deepcopy(gm)
    frames = []

    def counting_backend(graph_module, example_inputs):
        frames.append(graph_module)
        return torch._dynamo.backends.registry.lookup_backend("inductor")(graph_module, example_inputs)

    compiled = torch.compile(gm, backend=counting_backend, fullgraph=True)
    for _ in range(2):
        out = compiled(x)
        _loss(out).backward()
    _loss(eager(x)).backward()
    _loss(eager(x)).backward()
    assert len(frames) == 1
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(gm.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for k, p in velora_fx.projections(gm).items():
        assert torch.equal(p.v, v_before[k])


def test_transform_rejects_non_graph_modules():
    with pytest.raises(TypeError, match="symbolic_trace"):
        velora_fx.transform(MLP())


def test_double_backward_is_refused_not_wrong():
    gm = _transformed(MLP(), VeloraConfig(estimator=Velora(num_groups=8)))
    x = torch.randn(4, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(gm(x).sum(), x, create_graph=True)
    gm.eval()  # eval() does not change what is compressed (the rule of both routes): still refused
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(gm(x).sum(), x, create_graph=True)
