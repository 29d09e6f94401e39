"""Train a small LLaMA-style byte-level LM on the Python standard library's own sources with ``velora_fx.transform``.

Trains the same model twice from the same seed and data, once plain and once
transformed, prints the loss of both side by side and what velora_fx
compressed::

    python examples/quickstart.py --steps 60
"""

from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import sysconfig

import torch
import torch.nn.functional as F
from torch import nn

import velora_fx


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        hidden = 8 * dim // 3
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Real text no one here wrote: the standard library's own sources, as bytes."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.frombuffer(bytearray(data[:limit]), dtype=torch.uint8).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-groups", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    data = stdlib_bytes()
    starts = torch.randint(0, len(data) - args.seq - 1, (args.steps, args.batch))
    model = TinyLlama()
    plain = copy.deepcopy(model)
    gm = velora_fx.transform(torch.fx.symbolic_trace(model), velora_fx.VeloraConfig(num_groups=args.num_groups))

    runs = {"plain": plain, "velora_fx": gm}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=3e-3) for k, m in runs.items()}
    print(f"{'step':>5}  {'plain loss':>10}  {'velora_fx loss':>14}")
    for step in range(args.steps):
        window = torch.stack([data[s : s + args.seq + 1] for s in starts[step].tolist()])
        losses = {}
        for name, m in runs.items():
            optims[name].zero_grad()
            logits = m(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
            loss.backward()
            optims[name].step()
            losses[name] = loss.item()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"{step:>5}  {losses['plain']:>10.4f}  {losses['velora_fx']:>14.4f}")
    print()
    print(velora_fx.report(gm))


if __name__ == "__main__":
    main()
