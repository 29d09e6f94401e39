"""Convergence on real text: the same LLaMA, seed and data order, with and without VeLoRA-via-compiler.

Runs ``examples/pretrain_llama.py`` once per route (default ``torch.compile``;
``velora_fx.backend`` on every linear; the paper's value/down-projection
policy), one after the other, then plots the curves and tabulates the final
validation loss::

    python benchmarks/convergence.py --steps 1500 --minutes 30     # ~30 min per route on 2 cores
    python benchmarks/convergence.py --plot-only                   # redraw from benchmarks/results/

Writes ``benchmarks/results/convergence.jsonl``, ``convergence.json`` and ``convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(routes, extra) -> None:
    log = RESULTS / "convergence.jsonl"
    log.unlink(missing_ok=True)
    for route in routes:
        cmd = [sys.executable, str(ROOT / "examples" / "pretrain_llama.py"), "--route", route, "--log", str(log), *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def summarise() -> dict:
    curves: dict[str, list[dict]] = {}
    for line in (RESULTS / "convergence.jsonl").read_text().splitlines():
        rec = json.loads(line)
        curves.setdefault(rec["route"], []).append(rec)
    table = {}
    for route, recs in curves.items():
        vals = [r for r in recs if "val_loss" in r]
        last = vals[-1] if vals else None
        table[route] = {
            "steps": recs[-1]["step"],
            "minutes": recs[-1]["seconds"] / 60,
            "final_val_loss": last and last["val_loss"],
            "final_val_ppl_per_byte": last and math.exp(last["val_loss"]),
            "best_val_loss": min((r["val_loss"] for r in vals), default=None),
        }
    (RESULTS / "convergence.json").write_text(json.dumps(table, indent=2))
    base = table.get("inductor", {}).get("final_val_loss")
    print(f"{'route':<12}{'steps':>7}{'minutes':>9}{'final val loss':>16}{'gap vs inductor':>17}")
    for route, row in table.items():
        gap = "" if base is None or row["final_val_loss"] is None else f"{row['final_val_loss'] - base:+.4f}"
        print(f"{route:<12}{row['steps']:>7}{row['minutes']:>9.1f}{row['final_val_loss'] or float('nan'):>16.4f}{gap:>17}")
    plot(curves)
    return table


def plot(curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for route, recs in curves.items():
        steps = [r["step"] for r in recs]
        losses = [r["train_loss"] for r in recs]
        k = 25  # moving average for the noisy training loss
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax_train.plot(steps, smooth, label=route)
        vals = [r for r in recs if "val_loss" in r]
        ax_val.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], marker="o", ms=3, label=route)
    ax_train.set(title="training loss (moving average of 25)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    ax_val.set(title="validation loss (held-out stdlib files)", xlabel="step")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", nargs="+", default=["inductor", "velora", "velora-vd"])
    parser.add_argument("--plot-only", action="store_true")
    args, extra = parser.parse_known_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        run(args.routes, [*extra, "--quiet"])
    summarise()


if __name__ == "__main__":
    main()
