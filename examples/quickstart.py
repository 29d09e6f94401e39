"""velora_fx in two minutes: a small LLaMA-style LM on real text, compiled four ways, side by side.

Trains the same byte-level model (same seed, same batches of the Python standard library's own sources) with

* plain ``torch.compile`` (the baseline),
* ``torch.compile(model, backend=velora_fx.backend)``: the paper's VeLoRA,
* the recommended estimator (``RECOMMENDED``: every coordinate at 2 bits plus per-group scales, stochastic
  rounding), at about VeLoRA's bytes,
* VeLoRA with a memory budget (``make_backend(VeloraConfig(memory_budget=...))``: the partitioner recomputes
  more),

and prints, for each, the bytes kept for backward (measured, and as the report predicted them), the step time
relative to the baseline, and the training loss after the same steps; then the report of the velora_fx model::

    python examples/quickstart.py                 # ~1-2 minutes on 2 CPU cores
    python examples/quickstart.py --steps 200     # longer: the losses separate less than the noise
"""

from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import statistics
import sysconfig
import textwrap
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import velora_fx

#: the estimator the README recommends to new users (benchmarks/README.md, "Convergence")
RECOMMENDED = velora_fx.VeloraConfig(estimator=velora_fx.Quantized(bits=2))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    """Pre-norm LLaMA block: q/k/v/o attention (SDPA), SwiGLU MLP."""

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


def stdlib_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """Real text no one here wrote: the standard library's ``.py`` sources, as bytes."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) > limit:
            break
    return torch.frombuffer(data, dtype=torch.uint8).long()


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=g)
    return [torch.stack([data[s : s + seq + 1] for s in row.tolist()]) for row in starts]


def loss_of(model, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1))


def kept_for_backward(step) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.3, help="memory budget of the third run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    initial = TinyLlama(args.dim)
    data = batches(stdlib_bytes(), args.steps, args.batch, args.seq)

    runs = {
        "torch.compile": lambda m: torch.compile(m),
        "velora_fx": lambda m: torch.compile(velora_fx.prepare(m), backend=velora_fx.backend),
        "velora_fx, 2-bit": lambda m: torch.compile(velora_fx.prepare(m), backend=velora_fx.make_backend(RECOMMENDED)),
        f"velora_fx, budget {args.budget:g}": lambda m: torch.compile(
            velora_fx.prepare(m), backend=velora_fx.make_backend(velora_fx.VeloraConfig(memory_budget=args.budget))
        ),
    }
    results, models = {}, {}
    with tqdm(total=len(runs) * (args.steps + 1), desc="training", unit="step") as bar:
        for name, make in runs.items():
            bar.set_postfix_str(f"{name}: compiling")
            model = copy.deepcopy(initial)
            step_fn = make(model)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            kept = kept_for_backward(lambda: loss_of(step_fn, data[0]))  # first step: compiles, calibrates
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix_str(name)
            times, losses = [], []
            for chunk in data:
                start = time.perf_counter()
                loss = loss_of(step_fn, chunk)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
                losses.append(loss.item())
                bar.update(1)
            rep = velora_fx.report(model)
            results[name] = dict(kept=kept, predicted=rep.saved_bytes, step=statistics.median(times[1:]),
                                 loss=statistics.mean(losses[-5:]))  # fmt: skip
            models[name] = model

    base = results["torch.compile"]
    print(f"\n{args.steps} AdamW steps of {args.batch} x {args.seq} bytes, dim {args.dim}, {len(initial.layers)} "
          f"blocks; torch {torch.__version__}, torch threads: {torch.get_num_threads()}\n")  # fmt: skip
    print(f"{'':<24}{'kept for backward':>20}{'(report said)':>15}{'step time':>12}{'loss, last 5':>15}")
    for name, r in results.items():
        said = "-" if r["predicted"] is None else f"{r['predicted'] / 2**20:.2f} MiB"
        print(f"{name:<24}{r['kept'] / 2**20:>9.2f} MiB ({r['kept'] / base['kept']:.2f}x){said:>15}"
              f"{r['step'] / base['step']:>11.2f}x{r['loss']:>15.3f}")  # fmt: skip
    print(textwrap.fill("(kept: measured with saved_tensors_hooks, the loss's own included; the report's figure is "
                        "the compiled graphs'. Step time: median, relative to torch.compile. A short run: the "
                        "losses differ by a few steps' noise.)", 100) + "\n")  # fmt: skip
    print(velora_fx.report(models["velora_fx"]))


if __name__ == "__main__":
    main()
