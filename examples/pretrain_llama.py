"""Pre-train a small LLaMA (``transformers.LlamaForCausalLM``, unchanged) on local text with ``velora_fx.backend``.

Byte-level (vocabulary of 256), on the Python standard library's own sources
(real text no one here wrote; held-out files form the validation split). The
data order depends only on ``--seed`` and the step, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would::

    python examples/pretrain_llama.py --route velora --steps 300 --ckpt /tmp/llama.pt
    python examples/pretrain_llama.py --route velora --steps 600 --ckpt /tmp/llama.pt --resume
    python examples/pretrain_llama.py --route inductor --steps 300        # the baseline

``--route``: ``inductor`` (default ``torch.compile``), ``velora`` (all linears),
``velora-vd`` (the paper's value and down projections only), ``eager``. ``--config`` gives the
``VeloraConfig`` of the ``velora`` route as JSON (``VeloraConfig.to_dict()``), e.g.
``--config '{"estimator": "principal_random", "rank": 32, "refresh_every": 100}'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys
import sysconfig
import time

import torch
from tqdm import tqdm

import velora_fx

log = logging.getLogger("pretrain_llama")


def stdlib_corpus(val_fraction: float = 0.05, saved: pathlib.Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors from the standard library's ``.py`` files, split by file.

    ``saved``: a file written by ``--save-corpus`` (the same bytes on a machine whose Python differs).
    """
    if saved is not None:
        train, val = torch.load(saved)
        return train.long(), val.long()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    val_every = max(1, round(1 / val_fraction))
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % val_every == 0 else train).extend(path.read_bytes())
    return (torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long())


def make_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.dim, intermediate_size=args.dim * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def velora_config(args) -> velora_fx.VeloraConfig:
    if args.config:
        return velora_fx.VeloraConfig.from_dict(json.loads(args.config))
    if args.route == "velora-vd":
        return velora_fx.VeloraConfig(estimator=velora_fx.Velora(num_groups=args.num_groups),
                                      include=("*.v_proj.weight", "*.down_proj.weight"))
    return velora_fx.VeloraConfig(estimator=velora_fx.Velora(num_groups=args.num_groups))


def batch_at(data: torch.Tensor, step: int, args) -> torch.Tensor:
    """The batch of ``step``: a function of (seed, step) only, so resuming replays the same data."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=g)
    return torch.stack([data[s : s + args.seq] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val: torch.Tensor, args) -> float:
    model.eval()
    batches = (batch_at(val, -1 - i, args).to(args.device) for i in range(args.eval_batches))
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", choices=("inductor", "velora", "velora-vd", "eager"), default="velora")
    parser.add_argument("--num-groups", type=int, default=32)
    parser.add_argument("--config", default=None, help="the velora route's VeloraConfig as JSON (to_dict())")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step (an interruption: the schedule still spans --steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--ckpt", type=pathlib.Path, default=None, help="checkpoint file, written every --eval-every steps")
    parser.add_argument("--resume", action="store_true", help="continue from --ckpt")
    parser.add_argument("--log", type=pathlib.Path, default=None, help="append JSON lines of the curves here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corpus", type=pathlib.Path, default=None,
                        help="read the text from this file (written by --save-corpus) instead of this Python's stdlib")
    parser.add_argument("--save-corpus", type=pathlib.Path, default=None, help="write the text to this file and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    train, val = stdlib_corpus(saved=args.corpus)
    if args.save_corpus:
        torch.save((train.to(torch.uint8), val.to(torch.uint8)), args.save_corpus)
        return {"saved": str(args.save_corpus), "train_bytes": len(train), "val_bytes": len(val)}
    model = make_model(args).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    if args.route == "eager":
        step_model = model
    elif args.route == "inductor":
        step_model = torch.compile(model)
    else:  # prepared: the projections live in model.state_dict(), so the checkpoint below carries them
        velora_fx.prepare(model)
        step_model = torch.compile(model, backend=velora_fx.make_backend(velora_config(args)))

    start_step, history = 0, []
    if args.resume:
        state = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(state["model"])  # a prepared model takes its projections back too
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_step, history = state["step"], state["history"]

    t0 = time.perf_counter()
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=args.quiet, desc=args.route)
    for step in bar:
        tokens = batch_at(train, step, args).to(args.device)
        loss = step_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record = {"route": args.route, "step": step + 1, "train_loss": loss.item(), "seconds": time.perf_counter() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["val_loss"] = evaluate(step_model, val, args)
            if args.ckpt:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step + 1, "history": history + [record]}, args.ckpt)
        history.append(record)
        if args.log:
            with args.log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record.get('val_loss', float('nan')):.3f}")
        if args.minutes is not None and time.perf_counter() - t0 > 60 * args.minutes:
            break
        if args.stop_after is not None and step + 1 >= args.stop_after:
            break
    if args.route.startswith("velora") and not args.quiet:
        print(velora_fx.report(step_model))
    final = {"route": args.route, "steps": history[-1]["step"] if history else start_step,
             "val_loss": next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None),
             "lr": args.lr, "seed": args.seed,
             "config": velora_config(args).to_dict() if args.route.startswith("velora") else None}
    print(json.dumps(final))
    return final


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
