"""Small models of our own, shared by the tests (and the examples' smoke tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 128, d_out: int = 16, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, hidden, bias=bias)
        self.head = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: RMSNorm, q/k/v/o attention via SDPA, SwiGLU MLP (gate/up/down)."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 172):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, s, dim = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, s, self.heads, dim // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, dim))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaStack(nn.Module):
    def __init__(self, vocab: int = 97, dim: int = 64, layers: int = 2, heads: int = 4, hidden: int = 172):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class FunctionalNet(nn.Module):
    """Weights used through F.linear, ``x @ W``, ``x @ W.t()``, ``x @ W.T`` — and one frozen weight."""

    def __init__(self, dim: int = 48):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(96, dim) / dim**0.5)
        self.b1 = nn.Parameter(torch.randn(96) * 0.1)
        self.w2 = nn.Parameter(torch.randn(96, 80) / 96**0.5)
        self.w3 = nn.Parameter(torch.randn(64, 80) / 80**0.5)
        self.w4 = nn.Parameter(torch.randn(dim, 64) / 8)
        self.frozen = nn.Parameter(torch.randn(dim, dim) / dim**0.5, requires_grad=False)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        h = h @ self.w2
        h = F.silu(h @ self.w3.t())
        h = h @ self.w4.T
        return h @ self.frozen
