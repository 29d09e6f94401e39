"""FX route on a LLaMA-like block (D=256, hidden 688): bytes kept for backward and step time, against the plain model.

    python benchmarks/fx_block.py            # D=256, hidden 688, batch 4 x seq 128, fp32, 32 groups

Eager plain vs eager ``transform`` (and, with --compile, both under ``torch.compile``), same
weights and batch, one run; times are medians of interleaved steps, reported as ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import velora_fx  # noqa: E402
from benchmarks.measure import interleaved_medians, saved_bytes  # noqa: E402
from tests.models import LlamaBlock  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=688)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-groups", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also compare both under torch.compile (Inductor)")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = LlamaBlock(args.dim, heads=4, hidden=args.hidden)
    x = torch.randn(args.batch, args.seq, args.dim)
    config = velora_fx.VeloraConfig(estimator=velora_fx.Velora(num_groups=args.num_groups))
    gm = velora_fx.transform(torch.fx.symbolic_trace(copy.deepcopy(model)), config)
    velora_fx.calibrate(gm, x)
    runs = {"plain": model, "transform": gm}
    if args.compile:
        runs["plain+compile"] = torch.compile(copy.deepcopy(model))
        runs["transform+compile"] = torch.compile(gm, fullgraph=True)

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            F.mse_loss(m(x), x).backward()
        return run

    kept = {name: saved_bytes(lambda m=m: m(x))[0] for name, m in runs.items()}
    times = interleaved_medians({name: step(m) for name, m in runs.items()}, repeats=args.repeats)
    rows = []
    for name in runs:
        base = "plain+compile" if name.endswith("compile") else "plain"
        rows.append({"route": name, "kept_KiB": kept[name] / 1024, "kept_ratio": kept[name] / kept[base],
                     "time_ratio": times[name] / times[base]})
    print(f"LLaMA-like block D={args.dim} hidden={args.hidden} batch {args.batch} x seq {args.seq} fp32, "
          f"num_groups={args.num_groups}, {torch.get_num_threads()} threads")
    print(f"{'route':<20}{'kept for backward':>20}{'vs baseline':>14}{'step time vs baseline':>24}")
    for r in rows:
        print(f"{r['route']:<20}{r['kept_KiB']:>16.0f} KiB{r['kept_ratio']:>14.3f}{r['time_ratio']:>24.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
