"""What a new user does on day one, reproduced: save with safetensors, meta-device init, a backend built per model,
a checkpoint that must not resume wrong (issue "day one in a real training stack")."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import velora_fx
from velora_fx import Principal, Quantized, RandomProjection, VeloraConfig

from .backend_models import LlamaStack
from .helpers import kept_bytes, saved_bytes_step


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


def test_meta_device_then_to_empty_keeps_the_state_and_loads(trained):
    """``.to("meta")`` then ``to_empty`` raised "Cannot copy out of meta tensor" from the state's ``_apply``. The state
    does not follow ``.to()`` (NOTE [the state model]): it stays as it was, and a checkpoint loaded next replaces it."""
    model = copy.deepcopy(trained)
    before = {name: p.basis.clone() for name, p in velora_fx.projections(model).items()}
    model.to("meta")
    model.to_empty(device="cpu")
    projs = velora_fx.projections(model)
    assert projs.keys() == before.keys() and all(torch.equal(projs[k].basis, v) for k, v in before.items())
    model.load_state_dict(trained.state_dict())  # the usual next step: weights and projections back
    for name, proj in velora_fx.projections(trained).items():
        assert torch.equal(projs[name].basis, proj.basis), name


def test_a_model_built_on_the_meta_device_trains_after_to_empty():
    """The meta-device init of FSDP2 recipes: build on meta, prepare, ``to_empty``, initialise, train."""
    with torch.device("meta"):
        model = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    reference = copy.deepcopy(model)
    saved_bytes_step(torch.compile(model, backend=velora_fx.backend), x := torch.randn(2, 8, 64))
    projs = velora_fx.projections(model)
    assert projs and all(p.calibrated and p.basis.device.type == "cpu" for p in projs.values())
    reference(x).pow(2).mean().backward()  # dx and the bias-free rest exact: the norm weights' gradients agree
    assert torch.allclose(model.norm.weight.grad, reference.norm.weight.grad, atol=1e-5)


def test_prepare_leaves_a_sequential_as_it_was():
    """The state was a child module: ``len(seq)`` became 4, ``seq[-1]`` the state, and calling it raised
    ``Module [ProjectionState] is missing the required "forward" function``."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)]
    seq = velora_fx.prepare(torch.nn.Sequential(*layers))
    assert len(seq) == 3 and seq[-1] is layers[-1] and list(seq.children()) == layers
    assert [n for n, _ in seq.named_modules()] == ["", "0", "1", "2"]
    saved_bytes_step(torch.compile(seq, backend=velora_fx.backend), torch.randn(4, 8, 256))
    assert velora_fx.report(seq).compressed and set(velora_fx.projections(seq)) == {"0.weight", "2.weight"}
    state = seq.state_dict()
    assert {k for k in state if k.startswith("velora_fx.")} == {"velora_fx.0.weight.v", "velora_fx.2.weight.v"}
    fresh = velora_fx.prepare(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)))
    assert not fresh.load_state_dict(state).missing_keys
    assert all(torch.equal(p.basis, velora_fx.projections(seq)[k].basis) for k, p in velora_fx.projections(fresh).items())
    nested = torch.nn.ModuleDict({"inner": seq})  # one documented prefix, wherever the prepared model sits
    assert "inner.velora_fx.0.weight.v" in nested.state_dict()


def test_a_non_finite_basis_in_a_checkpoint_is_an_error_naming_its_key(trained):
    state = trained.state_dict()
    key = "velora_fx.layers.0.mlp.down_proj.weight.v"
    state[key] = state[key].clone()
    state[key][0] = float("nan")
    fresh = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    with pytest.raises(RuntimeError, match=rf"{key} holds NaN or inf"):
        fresh.load_state_dict(state)


def test_a_zero_key_in_a_checkpoint_is_an_error_and_a_zero_basis_means_uncalibrated(trained):
    """A quantized key of 0 is refused, naming the key. An all-zero basis is what an uncalibrated projection saves
    (the FX route's state right after ``transform``): it loads as uncalibrated and calibrates on the next batch."""
    state = {"velora_fx.fc1.weight.key": torch.zeros(1), "velora_fx.fc1.weight.step": torch.tensor(3)}
    fresh = velora_fx.prepare(torch.nn.Sequential())
    with pytest.raises(RuntimeError, match=r"velora_fx\.fc1\.weight\.key is 0"):
        fresh.load_state_dict(state, strict=False)
    zeros = {k: torch.zeros_like(v) if k.endswith(".v") else v for k, v in trained.state_dict().items()}
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    model.load_state_dict(zeros)
    assert not any(p.calibrated for p in velora_fx.projections(model).values())
    saved_bytes_step(torch.compile(model, backend=velora_fx.backend), torch.randn(2, 8, 64))
    assert all(p.calibrated for p in velora_fx.projections(model).values())


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


def test_the_backend_by_name_takes_its_config_from_options():
    """``torch.compile(model, backend="velora_fx")`` through the ``torch_dynamo_backends`` entry point; the config
    in ``options={"velora_fx": ...}`` (a dict or a ``VeloraConfig``), the other keys left to Inductor."""
    torch.manual_seed(0)
    model = velora_fx.prepare(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)))
    compiled = torch.compile(model, backend="velora_fx", options={"velora_fx": {"estimator": {"name": "quantized", "bits": 2}}})
    saved_bytes_step(compiled, torch.randn(4, 8, 256))
    rep = velora_fx.report(model)
    assert rep.compressed and "estimator quantized" in str(rep)
    assert {k.rpartition(".")[2] for k in model.state_dict() if k.startswith("velora_fx.")} == {"key", "step"}
    bad = torch.compile(torch.nn.Linear(256, 256), backend="velora_fx", options={"velora_fx": 3})
    with pytest.raises(Exception, match=r"options\['velora_fx'\] must be a VeloraConfig or its to_dict\(\)"):
        bad(torch.randn(4, 256, requires_grad=True))


def test_hf_trainer_saves_safetensors_and_resumes_bit_identically(tmp_path):
    """HF ``Trainer`` with a model compiled in place by name (``model.compile(backend="velora_fx")``; accelerate's
    ``TrainingArguments(torch_compile_backend=...)`` accepts only its own list of backend names): the checkpoint is
    safetensors with the state in it, and a run resumed from it ends bit-identical to the uninterrupted run."""
    transformers = pytest.importorskip("transformers")

    def model():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
        m = velora_fx.prepare(transformers.LlamaForCausalLM(cfg))
        m.compile(backend="velora_fx", options={"velora_fx": {"estimator": {"name": "quantized", "bits": 2}}})
        return m

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(16)]

    def trainer(m, out):
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                                              save_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)  # fmt: skip
        return transformers.Trainer(model=m, args=args, train_dataset=data)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inductor's C++ scatter-add (the embedding's gradient) sums in thread order
    try:
        _train_and_resume(model, trainer, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_and_resume(model, trainer, tmp_path):
    from safetensors.torch import load_file

    whole = model()
    trainer(whole, tmp_path / "a").train()
    saved = load_file(tmp_path / "a" / "checkpoint-2" / "model.safetensors")
    assert {k for k in saved if k.startswith("velora_fx.")} >= {"velora_fx.lm_head.weight.key", "velora_fx.lm_head.weight.step"}
    assert int(saved["velora_fx.lm_head.weight.step"]) == 2
    resumed = model()
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert velora_fx.report(resumed).compressed
    expected = whole.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_report_counts_one_step_after_a_recompile():
    """Batch 4, then batch 2 with ``dynamic=False``: two graphs of the same weights. The report summed both (17,408 B
    where one step keeps 6,656 B) and listed each site twice; it now counts the graph of the last step."""
    from .backend_models import TinyMLP

    torch.manual_seed(0)
    model = velora_fx.prepare(TinyMLP(dim=64, hidden=96))
    compiled = torch.compile(model, backend=velora_fx.backend, dynamic=False)
    kept_bytes(compiled, torch.randn(4, 64))
    kept = kept_bytes(compiled, torch.randn(2, 64))
    rep = velora_fx.report(model)
    assert [r.weight for r in rep] == ["fc1.weight", "fc2.weight"]
    assert rep.saved_bytes == kept and len(rep.graphs) == 1
    assert all(r.input_shape[0] == 2 for r in rep)


def test_a_basis_made_by_another_estimator_is_refused_in_both_routes():
    """A checkpoint trained with ``estimator="random"`` loaded under ``"principal"`` (same basis shape) trained on with
    the scaled random basis as if it were principal. The basis records which estimator made it."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    random_cfg, principal_cfg = VeloraConfig(estimator=RandomProjection(rank=8)), VeloraConfig(estimator=Principal(rank=8))
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(random_cfg)), x)
    state = model.state_dict()
    key = "velora_fx.layers.0.mlp.down_proj.weight.estimator"
    assert bytes(state[key].tolist()) == b"random"
    fresh = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    fresh.load_state_dict(state)
    with pytest.raises(Exception, match=r"made by the estimator 'random'.*this config's estimator is 'principal'"):
        saved_bytes_step(torch.compile(fresh, backend=velora_fx.make_backend(principal_cfg)), x)
    again = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    again.load_state_dict(state)  # the same estimator resumes
    saved_bytes_step(torch.compile(again, backend=velora_fx.make_backend(random_cfg)), x)

    from .backend_models import TinyMLP  # symbolically traceable, for the FX route

    mlp = velora_fx.prepare(TinyMLP(dim=64, hidden=96))
    saved_bytes_step(torch.compile(mlp, backend=velora_fx.make_backend(random_cfg)), torch.randn(4, 64))
    gm = velora_fx.transform(torch.fx.symbolic_trace(TinyMLP(dim=64, hidden=96)), principal_cfg)
    with pytest.raises(RuntimeError, match=r"was made by the estimator 'random'.*transformed with 'principal'"):
        gm.load_state_dict(mlp.state_dict())


def test_a_checkpoint_without_a_schedule_resumes_counting_from_its_load():
    """The resume rule (the issue's item 6): a step counter is saved when the run had a schedule (``refresh_every``,
    the quantized estimator's per-step key); a checkpoint of a run without one has none, and a run resumed from it
    with a schedule counts its steps from the load: its first refresh comes ``refresh_every`` steps after it."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    for _ in range(2):
        saved_bytes_step(torch.compile(model, backend=velora_fx.make_backend(VeloraConfig(estimator=RandomProjection(rank=8)))), x)
    state = model.state_dict()
    assert not any(k.endswith(".step") for k in state)
    resumed = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96))
    resumed.load_state_dict(state)
    scheduled = torch.compile(resumed, backend=velora_fx.make_backend(VeloraConfig(estimator=RandomProjection(rank=8, refresh_every=3))))  # fmt: skip
    name = "layers.0.mlp.down_proj.weight"
    first = velora_fx.projections(resumed)[name].basis.clone()
    for step in range(1, 5):
        saved_bytes_step(scheduled, x)
        proj = velora_fx.projections(resumed)[name]
        assert proj.steps == step and torch.equal(proj.basis, first) == (step <= 3), step
    assert int(resumed.state_dict()[f"velora_fx.{name}.step"]) == 4


def test_transform_then_compile_reports_the_fx_sites_with_their_bytes():
    """``transform(gm)`` then ``torch.compile(gm, backend=velora_fx.backend)``: the report said "saved 0 B" and blamed
    activation checkpointing (the compile backend saw the FX route's autograd.Function). The FX route owns its
    sites; the compile backend lends them the input shapes it saw."""
    from .backend_models import TinyMLP

    torch.manual_seed(0)
    gm = velora_fx.transform(torch.fx.symbolic_trace(TinyMLP(dim=64, hidden=96)))
    compiled = torch.compile(gm, backend=velora_fx.backend)
    saved_bytes_step(compiled, torch.randn(4, 64))
    rep = velora_fx.report(compiled)
    assert [r.weight for r in rep] == ["fc1.weight", "fc2.weight"] and len(rep.compressed) == 2
    assert [r.input_shape for r in rep] == [(4, 64), (4, 96)]
    assert all(0 < r.bytes_after < r.bytes_before for r in rep)
    assert "activation checkpointing" not in str(rep)


class _BothSides(torch.nn.Module):
    """One weight read on both sides of a graph break."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        y = torch.relu(self.lin(x))
        torch._dynamo.graph_break()
        return self.lin(y)


@pytest.mark.parametrize("setup", ["graph break", "accumulation", "eval with grad"])
def test_one_step_is_one_optimizer_step(setup):
    """A weight on both sides of a graph break counted two steps per training step (12 after 6), so refreshes came
    every 1.5 steps; micro-batches and eval forwards with grad counted too. NOTE [one step is one optimizer step]."""
    torch.manual_seed(0)
    model = velora_fx.prepare(_BothSides() if setup == "graph break" else torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)))  # fmt: skip
    cfg = VeloraConfig(estimator=RandomProjection(rank=8, refresh_every=2))
    compiled = torch.compile(model, backend=velora_fx.make_backend(cfg))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    micro = 3 if setup == "accumulation" else 1
    for _ in range(4):
        for _ in range(micro):
            compiled(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if setup == "eval with grad":
            compiled(torch.randn(4, 64)).sum().backward()  # e.g. a gradient norm probe: no optimizer step
            opt.zero_grad()
    projs = velora_fx.projections(model)
    # 4 steps taken; the 5th is counted by the first call after the 4th optimizer step (the probe, when there is one),
    # and the refresh due then (every 2 steps) happens at that call
    want_steps, want_refresh = (5, 4) if setup == "eval with grad" else (4, 2)
    assert projs and all(p.steps == want_steps for p in projs.values()), {n: p.steps for n, p in projs.items()}
    assert all(p.last_refresh == want_refresh for p in projs.values())


def test_from_pretrained_of_a_prepared_class_then_load_state(tmp_path):
    """HF ``from_pretrained`` keeps only the keys a fresh model lists, and a fresh prepared model lists no projections
    yet: it drops them (as unexpected). ``velora_fx.load_state(model, directory)`` loads them from the checkpoint."""
    transformers = pytest.importorskip("transformers")

    class PreparedLlama(transformers.LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            velora_fx.prepare(self)

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = PreparedLlama(cfg)
    ids = torch.randint(0, 64, (2, 16))
    torch.compile(model, backend="velora_fx")(input_ids=ids, labels=ids).loss.backward()
    model.save_pretrained(tmp_path)
    loaded = PreparedLlama.from_pretrained(tmp_path)
    assert velora_fx.load_state(loaded, tmp_path) == len([k for k in model.state_dict() if k.startswith("velora_fx.")])
    want, got = velora_fx.projections(model), velora_fx.projections(loaded)
    assert want.keys() == got.keys() and all(torch.equal(got[k].basis, want[k].basis) for k in want)
    with pytest.raises(ValueError, match="is not prepared"):
        velora_fx.load_state(torch.nn.Linear(2, 2), tmp_path)


def test_one_step_is_one_optimizer_step_on_the_fx_route():
    """The FX route counts by the same rule: 3 micro-batches per optimizer step, 4 steps -> 4."""
    from .backend_models import TinyMLP

    torch.manual_seed(0)
    gm = velora_fx.transform(torch.fx.symbolic_trace(TinyMLP(dim=64, hidden=96)),
                             VeloraConfig(estimator=RandomProjection(rank=8, refresh_every=2)))  # fmt: skip
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    for _ in range(4):
        for _ in range(3):
            gm(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    projs = velora_fx.projections(gm)
    assert projs and all(p.steps == 4 and p.last_refresh == 2 for p in projs.values()), {n: p.steps for n, p in projs.items()}
