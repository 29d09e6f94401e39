"""Are two commits numerically identical? Gradients and saved state of 3 SGD steps, every estimator, both routes.

A refactor that must not change numerics is checked by running this at both commits and comparing, bit for bit::

    git worktree add /tmp/before <commit> && ln -s ../passes /tmp/before/velora_fx/passes
    (cd /tmp/before && python /path/to/benchmarks/same_numerics.py run /tmp/before.pt)
    python benchmarks/same_numerics.py run /tmp/after.pt
    python benchmarks/same_numerics.py compare /tmp/before.pt /tmp/after.pt

``run`` imports velora_fx from the current directory (the checkout under test). The configs cover every estimator,
a re-seeding and a per-step (``ema``) schedule with a refresh at step 2; in the model, one input is read by two
weights (one shared basis).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, ".")  # the checkout in the current directory, not the installed one
import velora_fx  # noqa: E402
from velora_fx import Quantized, VeloraConfig  # noqa: E402

CONFIGS = {
    "velora": VeloraConfig(num_groups=8),
    "velora_random_refresh": VeloraConfig(num_groups=8, init="random", refresh_every=2),
    "velora_ema": VeloraConfig(num_groups=8, init="ema"),
    "random": VeloraConfig(estimator="random", rank=8, refresh_every=2),
    "principal": VeloraConfig(estimator="principal", rank=8, refresh_every=2),
    "principal_random": VeloraConfig(estimator="principal_random", rank=8, random_rank=4, refresh_every=2),
    "quant2": VeloraConfig(estimator=Quantized(bits=2)),
    "quant3_nearest": VeloraConfig(estimator=Quantized(bits=3, rounding="nearest")),
}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(64, 64), nn.Linear(64, 64)
        self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.k(x)
        return x + self.down(F.silu(self.up(h)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def run(path: str) -> None:
    out = {}
    for name, cfg in CONFIGS.items():
        for route in ("compile", "fx"):
            torch.manual_seed(0)
            torch._dynamo.reset()
            model = Stack()
            if route == "compile":
                step_fn = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))
            else:
                model = step_fn = velora_fx.transform(torch.fx.symbolic_trace(model), cfg)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            grads = []
            for step in range(3):
                x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(step))
                step_fn(x).pow(2).mean().backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
                opt.step()
                opt.zero_grad()
            state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("velora_fx.")}
            out[(name, route)] = (grads, state)
    torch.save(out, path)
    print("saved", len(out), "runs to", path)


def compare(a: str, b: str) -> bool:
    before, after = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    same = before.keys() == after.keys()
    for key in before:
        (ga, sa), (gb, sb) = before[key], after[key]
        grads = len(ga) == len(gb) == 3 and all(
            x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x) for x, y in zip(ga, gb)
        )
        state = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        print(f"{key[0]:24} {key[1]:8} gradients {'identical' if grads else 'DIFFER'}, "
              f"state ({len(sb)} entries) {'identical' if state else 'DIFFERS'}")  # fmt: skip
        same &= grads and state
    print("bit-identical" if same else "NOT bit-identical")
    return same


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) else 1)
    else:
        sys.exit(__doc__)
