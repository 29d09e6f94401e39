"""The models and batches that peers.py (CPU) and gpu.py (CUDA) measure, and the commit.

One factory for both scripts, so that a CPU row and a GPU row of the same
``(kind, hidden, layers, seq, vocab)`` are the same model. torch and transformers
are imported inside the functions: peers.py's parent process imports this module
and must not import torch.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Width of one attention head: a model of width ``hidden`` has ``hidden // HEAD_DIM`` heads.
HEAD_DIM = 32
#: LLaMA's FFN width, 8/3 of ``hidden``, is rounded up to a multiple of this.
FFN_MULTIPLE = 8
#: ViT: square patches of this many pixels a side, and this many classes.
VIT_PATCH = 8
VIT_CLASSES = 10


def make_model(kind: str, hidden: int, layers: int, seq: int, vocab: int):
    """A transformers model with random weights (seed 0), in training mode.

    ``kind`` is ``llama``, ``gpt2`` or ``vit``; ``hidden`` x ``layers`` is its size,
    ``seq`` its sequence length (ViT: about ``seq`` patches per image), ``vocab`` the
    vocabulary of the language models. The shape:

    * ``llama``: ``LlamaForCausalLM``, ``hidden // 32`` heads of 32 (as many KV
      heads), FFN 8/3 * ``hidden`` rounded up to a multiple of 8, positions
      ``max(seq, 128)``;
    * ``gpt2``: ``GPT2LMHeadModel``, ``hidden // 32`` heads of 32, FFN 4 * ``hidden``,
      positions ``max(seq, 128)``, dropout off;
    * ``vit``: ``ViTForImageClassification``, ``hidden // 32`` heads of 32, FFN
      4 * ``hidden``, 8 x 8 patches, ``vit_side(seq) ** 2`` patches per image (plus the
      class token), 3 channels, 10 classes, dropout off.

    This is the shape peers.py always used (every CPU table of benchmarks/README.md
    and README.md: h128 / h256, heads of 32, ViT 8 x 8 patches). gpu.py had its own
    shape until it shared this factory: heads of 64, FFN rounded to a multiple of
    128, ViT 16 x 16 patches and 1000 classes. The GPU results recorded with it
    (``benchmarks/results/gpu_*.json``: LLaMA h1024 x 8 with 16 heads and FFN 2816)
    are of that model; this factory's h1024 LLaMA has 32 heads and FFN 2736.
    """
    import torch
    import transformers as tf

    torch.manual_seed(0)
    heads = max(1, hidden // HEAD_DIM)
    if kind == "llama":
        ffn = (hidden * 8 // 3 + FFN_MULTIPLE - 1) // FFN_MULTIPLE * FFN_MULTIPLE
        cfg = tf.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=max(seq, 128),
        )
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            vocab_size=vocab,
            n_positions=max(seq, 128),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "vit":
        cfg = tf.ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            image_size=vit_side(seq) * VIT_PATCH,
            patch_size=VIT_PATCH,
            num_channels=3,
            num_labels=VIT_CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = tf.ViTForImageClassification(cfg)
    else:
        raise ValueError(kind)
    return model.train()


def vit_side(seq: int) -> int:
    """Patches per image side: the ViT's sequence is side² patches (+1 class token)."""
    return max(2, round(seq**0.5))


def tokens_per_sample(kind: str, seq: int) -> int:
    """Tokens one sample feeds the model: ``seq``, or the ViT's patches (class token not counted)."""
    return vit_side(seq) ** 2 if kind == "vit" else seq


def make_batch(
    kind: str, batch: int, seq: int, vocab: int, device: str = "cpu"
) -> dict:
    """The keyword arguments of one training step of ``make_model(kind, ...)`` (seed 1, drawn on the CPU)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        side = vit_side(seq) * VIT_PATCH
        pixels = torch.randn(batch, 3, side, side, generator=g)
        labels = torch.randint(0, VIT_CLASSES, (batch,), generator=g)
        return {"pixel_values": pixels.to(device), "labels": labels.to(device)}
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def commit() -> str:
    """The commit measured: ``$VELORA_COMMIT`` (a copied tree has no ``.git``), else ``git rev-parse``.

    Uncommitted changes in the tree are not seen: measure a clean checkout.
    """
    if os.environ.get("VELORA_COMMIT"):
        return os.environ["VELORA_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no git on this machine
        return "unknown"
    return done.stdout.strip() or "unknown"
