"""Small models for tests/test_backend.py: LLaMA-like blocks, a graph break, two instances of a class, tied weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        *lead, dim = x.shape
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(-3, -2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(-3, -2).reshape(*lead, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 96):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStack(nn.Module):
    def __init__(self, blocks: int = 2, dim: int = 64, heads: int = 4, hidden: int = 96):
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, hidden) for _ in range(blocks))
        self.norm = RMSNorm(dim)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class BrokenMLPBlock(nn.Module):
    """A residual MLP block with a graph break in its forward: Dynamo compiles its frames once for all instances."""

    def __init__(self, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.mlp = SwiGLU(dim, hidden)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.mlp(x)
        torch._dynamo.graph_break()
        return x + self.out(torch.tanh(x))


class BrokenStack(nn.Module):
    """Two instances of ``BrokenMLPBlock``: several graphs, and graphs shared between instances."""

    def __init__(self, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(BrokenMLPBlock(dim, hidden) for _ in range(2))

    def forward(self, x):
        x = self.layers[0](self.proj_in(x))  # no loop: Dynamo resumes this frame after the nested break
        return self.layers[1](x)


class TiedLM(nn.Module):
    """Embedding and output projection share one weight; ``relu`` keeps its output, so ``fc2``'s input stays exact."""

    def __init__(self, vocab: int = 50, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return F.linear(h, self.embed.weight)


class TinyMLP(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)) * 2.0)
