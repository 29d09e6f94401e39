"""Convergence on real text, tuned: each weight-gradient estimator at its own best learning rate, on two seeds.

Every run is ``examples/pretrain_llama.py`` (a 7.3M-parameter byte-level ``LlamaForCausalLM``, hidden 384 × 4
layers, 1500 AdamW steps of 8 × 128 bytes of the standard library's sources, cosine schedule, held-out files for
validation); the data order depends on the seed only, so every method sees the same batches. A method is a
``--route`` and, for velora_fx, a ``VeloraConfig`` (``METHODS``); all keep 32 scalars per token unless named ``-k``.

    python benchmarks/convergence.py run --methods exact,velora,prand-r100 --lrs 5e-4,1e-3,2e-3 --seeds 0,1 --jobs 2
    python benchmarks/convergence.py summary            # table + plots from the runs found

A run takes ~15-25 minutes on one core (one torch thread per run, ``--jobs`` runs at a time). ``summary`` tunes
each method's learning rate on seed 0 (the lowest final validation loss among the rates tried; ``bracketed`` when a
worse rate lies on each side) and reads seed 1 at that rate only: seed 1 is a held-out check of the tuned rate,
its gap not flattered by the selection. The gap is to the tuned exact baseline, per seed. It writes
``benchmarks/results/convergence/`` (compact curves of every run, ``summary.json``, ``convergence.png``,
``convergence_lr.png``, ``convergence_rank.png``); ``summary --readmes`` also rewrites the tables of both READMEs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "out" / "sweep"
RESULTS = ROOT / "benchmarks" / "results" / "convergence"
MODEL_ARGS = ["--steps", "1500", "--batch", "8", "--seq", "128", "--dim", "384", "--layers", "4", "--heads", "6",
              "--eval-every", "100", "--eval-batches", "16"]  # fmt: skip


def _velora(**config) -> list[str]:
    """pretrain_llama's arguments for a ``VeloraConfig`` given as ``to_dict()`` fields (``estimator``: a dict)."""
    return ["--route", "velora", "--config", json.dumps(config, separators=(",", ":"))] if config else ["--route", "velora"]


#: name -> pretrain_llama arguments. 32 scalars per token everywhere (VeLoRA: 32 groups) unless the name says -k.
METHODS = {
    "exact": ["--route", "inductor"],
    "velora": _velora(),
    "random": _velora(estimator={"name": "random", "rank": 32}),
    "random-r100": _velora(estimator={"name": "random", "rank": 32, "refresh_every": 100}),
    "random-r10": _velora(estimator={"name": "random", "rank": 32, "refresh_every": 10}),
    "random-r1": _velora(estimator={"name": "random", "rank": 32, "refresh_every": 1}),
    "principal": _velora(estimator={"name": "principal", "rank": 32}),
    "principal-r100": _velora(estimator={"name": "principal", "rank": 32, "refresh_every": 100}),
    "prand": _velora(estimator={"name": "principal_random", "rank": 32}),
    "prand-r100": _velora(estimator={"name": "principal_random", "rank": 32, "refresh_every": 100}),
    **{f"prand-r100-k{k}": _velora(estimator={"name": "principal_random", "rank": k, "refresh_every": 100}) for k in (8, 16, 64)},
    **{f"random-r100-k{k}": _velora(estimator={"name": "random", "rank": k, "refresh_every": 100}) for k in (8, 16, 64)},
    # every coordinate at a few bits (groups of 32, a bfloat16 low end and step each): bits + 1 per element
    **{f"quant{b}": _velora(estimator={"name": "quantized", "bits": b}) for b in (1, 2, 3, 4)},
    "quant4-nearest": _velora(estimator={"name": "quantized", "bits": 4, "rounding": "nearest"}),
    "quant2-g128": _velora(estimator={"name": "quantized", "bits": 2, "group_size": 128}),
    # per-weight sizes (VeloraConfig.overrides): down_proj's 1024 features at 1 bit, within VeLoRA's bytes
    "quant2-g128-down1": _velora(estimator={"name": "quantized", "bits": 2, "group_size": 128},
                                 overrides={"*.down_proj.weight": {"name": "quantized", "bits": 1, "group_size": 128}}),
    # ... with down_proj's groups rotated (randomized Hadamard) before its 1-bit codes: the same bytes
    "quant2-g128-down1h": _velora(estimator={"name": "quantized", "bits": 2, "group_size": 128},
                                  overrides={"*.down_proj.weight": {"name": "quantized", "bits": 1, "group_size": 128,
                                                                    "rotation": "hadamard"}}),
    # ... with the 2-bit codes rounded to nearest (4 bits nearest beat 4 bits stochastic); down_proj's 1 bit stays
    # stochastic (a 1-bit nearest code is a sign)
    "quant2n-g128-down1h": _velora(estimator={"name": "quantized", "bits": 2, "group_size": 128, "rounding": "nearest"},
                                   overrides={"*.down_proj.weight": {"name": "quantized", "bits": 1, "group_size": 128,
                                                                     "rotation": "hadamard", "rounding": "stochastic"}}),
}  # fmt: skip

#: the estimator the README recommends (from the table ``summary`` prints)
RECOMMENDED = "quant2"

#: the projection whose scalars per token were swept: ``{K_SWEEP}-k{k}``
K_SWEEP = "random-r100"

#: the seed the learning rate is tuned on; the other seeds run the tuned rate (a held-out check)
TUNING_SEED = 0


def run_one(method: str, lr: str, seed: int, out: pathlib.Path, extra=(), done_dirs=None, deadline=None) -> str:
    """One run of ``pretrain_llama.py`` logged to ``out``; skipped when a finished log is in ``done_dirs``.

    ``done_dirs`` defaults to ``out`` and the committed results (a clean clone runs what is missing); ``deadline``
    (``time.monotonic()`` value) stops a run still going then, keeping its partial log.
    """
    log = out / f"{method}_lr{lr}_seed{seed}.jsonl"
    for done_before in (d / log.name for d in (done_dirs or (log.parent, RESULTS))):
        if done_before.exists() and _final(done_before) is not None:
            return f"{log.name}: done before ({done_before.parent.name})"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "examples" / "pretrain_llama.py"), *MODEL_ARGS, *METHODS[method],
           "--lr", lr, "--seed", str(seed), "--quiet", "--log", str(log), *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{log.name}: stopped at the deadline"
    return f"{log.name}: rc={done.returncode} {done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]}"


def _records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final(path: pathlib.Path):
    recs = _records(path)
    return recs[-1].get("val_loss") if recs and recs[-1].get("step") == 1500 else None


def collect(dirs) -> dict:
    """(method, lr, seed) -> records, from every ``<method>_lr<lr>_seed<seed>.jsonl`` in ``dirs`` (later dirs win)."""
    runs = {}
    for d in dirs:
        for path in sorted(pathlib.Path(d).glob("*_lr*_seed*.jsonl")):
            method, rest = path.stem.split("_lr", 1)
            lr, seed = rest.split("_seed")
            recs = _records(path)
            if recs and recs[-1].get("step") == 1500 and "val_loss" in recs[-1]:
                runs[(method, lr, int(seed))] = recs
    return runs


def summarise(runs: dict) -> dict:
    """Per method: the learning rate is tuned on seed 0, and that rate alone is re-run on seed 1.

    Seed 1 is thus a held-out check of the tuned rate: its gap is not flattered by the selection. ``bracketed``
    says the tuned rate has a worse rate on each side (on seed 0); ``tuned`` that it is bracketed among at least
    three rates and has its second seed.
    """
    methods = sorted({m for m, _, _ in runs}, key=lambda m: list(METHODS).index(m) if m in METHODS else 99)
    out = {}
    for method in methods:
        lrs = sorted({lr for m, lr, _ in runs if m == method}, key=float)
        seeds = sorted({s for m, _, s in runs if m == method})
        grid = {lr: {s: runs[(method, lr, s)][-1]["val_loss"] for s in seeds if (method, lr, s) in runs} for lr in lrs}
        tried = [lr for lr in lrs if TUNING_SEED in grid[lr]]
        best = min(tried, key=lambda lr: grid[lr][TUNING_SEED]) if tried else None
        i = tried.index(best) if best else None
        bracketed = best is not None and 0 < i < len(tried) - 1
        out[method] = {"grid": grid, "best_lr": best, "bracketed": bracketed,
                       "tuned": bracketed and len(tried) >= 3 and len(grid[best]) >= 2,
                       "best": grid[best] if best else None}  # fmt: skip
    base = out.get("exact", {}).get("best")
    for m in out.values():
        if base and m["best"]:
            m["gap"] = {s: m["best"][s] - base[s] for s in m["best"] if s in base}
            m["gap_mean"] = sum(m["gap"].values()) / len(m["gap"]) if m["gap"] else None
    return out


def _joined(values, fmt: str) -> str:
    """Per-seed figures as the tables show them: ``1.3632 / 1.3846``."""
    return " / ".join(format(v, fmt) for v in values)


def _how(m: dict) -> str:
    """How far a method's rate is tuned, in the READMEs' words."""
    return "bracketed" if m["bracketed"] else ("one rate" if len(m["grid"]) == 1 else "at the edge")


def table(summary: dict) -> str:
    """Every run: the terminal's view."""
    yes = {True: "yes", False: "no"}
    lines = ["| method | lr: final val loss (seed 0 / seed 1) | best lr (seed 0) | bracketed | tuned | best (s0 / s1) | gap to exact (s0 / s1, mean) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, m in summary.items():
        grid = "; ".join(f"{lr}: " + _joined(g.values(), ".4f") for lr, g in m["grid"].items())
        best = _joined(m["best"].values(), ".4f") if m["best"] else "—"
        gap = "—"
        if m.get("gap"):
            gap = _joined(m["gap"].values(), "+.4f") + f", {m['gap_mean']:+.4f}"
        lines.append(f"| {method} | {grid} | {m['best_lr']} | {yes[m['bracketed']]} | {yes[m['tuned']]} | {best} | {gap} |")
    return "\n".join(lines)


#: how the READMEs name a method (the ``-k`` variants go to the k table)
LABELS = {
    "exact": "default `torch.compile` (full activations)",
    "velora": "VeLoRA, the paper's (`VeloraConfig()`)",
    "random": "`random`, never re-seeded",
    "random-r100": "`random`, re-seeded every 100 steps",
    "random-r10": "`random`, re-seeded every 10 steps",
    "random-r1": "`random`, re-seeded every step",
    "principal": "`principal`, first batch, fixed",
    "principal-r100": "`principal`, followed every 100 steps",
    "prand": "`principal_random` (16 + 16), fixed",
    "prand-r100": "`principal_random` (16 + 16), every 100 steps",
    "quant1": "`Quantized(bits=1)`: every coordinate at 1 bit + scales (2 bits/element)",
    "quant2": "`Quantized(bits=2)`: 2 bits + scales (3 bits/element)",
    "quant3": "`Quantized(bits=3)`: 3 bits + scales (4 bits/element)",
    "quant4": "`Quantized(bits=4)`: 4 bits + scales (5 bits/element)",
    "quant4-nearest": "`Quantized(bits=4, rounding=\"nearest\")`",
    "quant2-g128": "`Quantized(bits=2, group_size=128)` (2.25 bits/element)",
    "quant2-g128-down1": "`Quantized(bits=2, group_size=128)`, `down_proj` at `bits=1` (1.25 bits/element)",
    "quant2-g128-down1h": "... and `down_proj` rotated first (`rotation=\"hadamard\"`)",
    "quant2n-g128-down1h": "... and the 2-bit codes rounded to nearest (`down_proj`'s 1 bit stochastic)",
}

BYTES = RESULTS / "bytes.json"


def measure_bytes(methods) -> dict:
    """Bytes kept for backward by one training step of the study's model (measured: distinct storages packed by
    ``saved_tensors_hooks``, parameters excluded), per method, in one process, side by side."""
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    import pretrain_llama as pl

    import velora_fx
    from benchmarks.measure import saved_bytes

    opts = dict(zip(MODEL_ARGS[::2], MODEL_ARGS[1::2]))

    class Shape:  # the study's model and batch (MODEL_ARGS), seed 0
        dim, layers, heads = int(opts["--dim"]), int(opts["--layers"]), int(opts["--heads"])
        seq, batch, seed = int(opts["--seq"]), int(opts["--batch"]), 0

    train, _ = pl.stdlib_corpus()
    tokens = pl.batch_at(train, 0, Shape)
    out = {}
    for method in methods:
        torch._dynamo.reset()  # each config is its own backend: a recompile per method would hit Dynamo's limit
        spec = dict(zip(METHODS[method][::2], METHODS[method][1::2]))
        model = pl.make_model(Shape)
        if spec["--route"] == "inductor":
            compiled = torch.compile(model)
        else:
            cfg = velora_fx.VeloraConfig.from_dict(json.loads(spec["--config"])) if "--config" in spec else velora_fx.VeloraConfig()
            compiled = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))
        for _ in range(2):  # the second step: calibrated, what every later step keeps
            nbytes, loss = saved_bytes(lambda: compiled(input_ids=tokens, labels=tokens).loss)
            loss.backward()
            model.zero_grad(set_to_none=True)
        out[method] = nbytes
        print(f"{method}: {nbytes} bytes", flush=True)
    return out


def _bytes() -> dict:
    """Measured bytes kept for backward per method (``convergence.py bytes``), if measured."""
    return json.loads(BYTES.read_text()) if BYTES.exists() else {}


def _kept(method: str, measured: dict) -> str:
    """A method's bytes kept for backward as the READMEs show them: × exact training's and × VeLoRA's."""
    if method not in measured or "exact" not in measured:
        return "—"
    out = f"{measured[method] / measured['exact']:.3f}×"
    return out + (f" ({measured[method] / measured['velora']:.3f}× VeLoRA's)" if "velora" in measured and method != "exact" else "")


def readme_table(summary: dict) -> str:
    measured = _bytes()
    lines = ["| method | learning rates tried (seeds) | best lr on seed 0 | final val loss at that lr (seed 0 / 1) | gap to tuned exact (seed 0 / 1) | bytes kept for backward (× exact) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method, m in summary.items():
        if method not in LABELS or not m["best_lr"]:
            continue
        label = f"**{LABELS[method]} (recommended)**" if method == RECOMMENDED else LABELS[method]
        tried = ", ".join(f"{lr} ({','.join(str(s) for s in g)})" for lr, g in m["grid"].items())
        gap = "—"
        if method != "exact" and m.get("gap"):
            gap = _joined(m["gap"].values(), "+.3f")
            if len(m["gap"]) > 1:
                gap += f" (mean **{m['gap_mean']:+.3f}**)"
        lines.append(f"| {label} | {tried} | {m['best_lr']} ({_how(m)}) | {_joined(m['best'].values(), '.4f')} | {gap} |"
                     f" {_kept(method, measured)} |")
    return "\n".join(lines)


def readme_k_table(summary: dict, dim: int = 384) -> str:
    lines = ["| k (scalars per token) | bytes of `p` / input | lr | final val loss (seed 0 / 1) | gap to tuned exact (seed 0 / 1) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k in (8, 16, 32, 64):
        m = summary.get(K_SWEEP if k == 32 else f"{K_SWEEP}-k{k}")
        if not m or not m["best_lr"] or not m.get("gap"):
            continue
        lines.append(f"| {k} | {k}/{dim} = {k / dim:.3f} | {m['best_lr']} ({_how(m)}) | {_joined(m['best'].values(), '.4f')} |"
                     f" {_joined(m['gap'].values(), '+.3f')} |")
    return "\n".join(lines)


def write_readmes(summary: dict, paths=(ROOT / "README.md", ROOT / "benchmarks" / "README.md")) -> list[pathlib.Path]:
    """Replace the tables between the ``<!-- table ... -->`` / ``<!-- k-table ... -->`` markers of ``paths``."""
    written = []
    for path in map(pathlib.Path, paths):
        text = original = path.read_text()
        for marker, body in (("table", readme_table(summary)), ("k-table", readme_k_table(summary))):
            text = re.sub(rf"(<!-- {marker} [^>]*-->\n).*?(\n<!-- /{marker} -->)",
                          lambda mt, body=body: mt.group(1) + body + mt.group(2), text, flags=re.S)  # fmt: skip
        if text != original:
            path.write_text(text)
            written.append(path)
    return written


def plots(runs: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [m for m in summary if "-k" not in m]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    for method in main:
        g = summary[method]["grid"]
        lrs = [lr for lr in g if TUNING_SEED in g[lr]]
        ax.plot([float(lr) for lr in lrs], [g[lr][TUNING_SEED] for lr in lrs], "o-", ms=4, label=method)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"final validation loss (nats/byte), seed {TUNING_SEED}",
           title="Each estimator's learning-rate sweep (32 scalars per token)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence_lr.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=90)
    for method in main:
        m = summary[method]
        if not m["best_lr"]:
            continue
        for seed in m["best"]:
            ax = axes[seed]
            recs = [r for r in runs[(method, m["best_lr"], seed)] if "val_loss" in r]
            ax.plot([r["step"] for r in recs], [r["val_loss"] for r in recs], label=f"{method} (lr {m['best_lr']})",
                    color=plt.cm.tab10(main.index(method) % 10))  # one colour per method in both panels
    for ax, seed in zip(axes, (0, 1)):
        ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title=f"seed {seed}, each at its best lr", ylim=(1.2, 2.2))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence.png")
    plt.close(fig)

    ks = [(k, f"{K_SWEEP}-k{k}") for k in (8, 16)] + [(32, K_SWEEP)] + [(64, f"{K_SWEEP}-k64")]
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=90)
    for seed, style in ((0, "o-"), (1, "s--")):  # each k at its own rate tuned on seed 0; seed 1 at that rate
        pts = [(k, summary[m]["gap"][seed]) for k, m in ks if m in summary and seed in summary[m].get("gap", {})]
        if pts:
            ax.plot([k for k, _ in pts], [g for _, g in pts], style, label=f"seed {seed}")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(xscale="log", xlabel="scalars kept per token (k); bytes of p = k/D of the input",
           ylabel="gap to tuned exact (nats/byte)", title=f"{K_SWEEP}: bytes vs loss, each k at its best lr")
    ax.set_xticks([k for k, _ in ks], [str(k) for k, _ in ks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence_rank.png")
    plt.close(fig)


def plot_bytes(summary: dict) -> None:
    """Bytes kept for backward (measured, whole model) against the gap to tuned exact, every method measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = _bytes()
    if "exact" not in measured:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=90)
    for i, (method, m) in enumerate((k, v) for k, v in summary.items() if k in measured and v.get("gap")):
        x = measured[method] / measured["exact"]
        for seed, gap in m["gap"].items():
            ax.plot([x], [gap], "o" if seed == 0 else "s", color=plt.cm.tab20(i % 20), ms=6,
                    label=method if seed == min(m["gap"]) else None)  # fmt: skip
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(xlabel="bytes kept for backward, × exact training (measured, whole model)",
           ylabel="gap to tuned exact (nats/byte)", title="Memory against quality, each at its best lr (o seed 0, □ seed 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence_bytes.png")
    plt.close(fig)


def compact(runs: dict, results: pathlib.Path = RESULTS) -> None:
    """Every run's curves, thinned (every 10th training step, every validation) into the results directory."""
    for (method, lr, seed), recs in runs.items():
        keep = [r for r in recs if "val_loss" in r or r["step"] % 10 == 0]
        (results / f"{method}_lr{lr}_seed{seed}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing (method, lr, seed) runs")
    r.add_argument("--methods", default="exact,velora,random-r100,principal,prand-r100")
    r.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--out", type=pathlib.Path, default=RUNS)
    r.add_argument("--device", default="cpu", help="another device is another study: only --out counts as done before")
    r.add_argument("--corpus", type=pathlib.Path, default=None, help="pretrain_llama's --corpus (the same bytes elsewhere)")
    r.add_argument("--deadline", type=float, default=None, help="stop every run still going after this many seconds")
    b = sub.add_parser("bytes", help="bytes kept for backward per method, measured on the study's model (one process)")
    b.add_argument("--methods", default="exact,velora,random-r100,principal,prand-r100,quant1,quant2,quant3,quant4,quant2-g128,"
                                        "quant2-g128-down1")
    s = sub.add_parser("summary", help="table and plots from the runs found")
    s.add_argument("--dirs", nargs="+", default=[str(RESULTS), str(RUNS)])
    s.add_argument("--readmes", action="store_true", help="also rewrite the tables in README.md and benchmarks/README.md")
    s.add_argument("--results", type=pathlib.Path, default=None,
                   help="another study (e.g. the runs of `run --device cuda`): its table and summary.json go here, "
                        "the plots and READMEs are left alone")  # fmt: skip
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.cmd == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        jobs = [(m, lr, int(sd)) for sd in args.seeds.split(",") for m in args.methods.split(",") for lr in args.lrs.split(",")]
        unknown = {m for m, _, _ in jobs} - set(METHODS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
        extra = ["--device", args.device] + (["--corpus", str(args.corpus)] if args.corpus else [])
        done_dirs = (args.out,) if args.device != "cpu" else None
        deadline = None if args.deadline is None else time.monotonic() + args.deadline
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda j: run_one(*j, args.out, extra, done_dirs, deadline), jobs):
                print(line, flush=True)
        return
    if args.cmd == "bytes":
        measured = measure_bytes(args.methods.split(","))
        known = json.loads(BYTES.read_text()) if BYTES.exists() else {}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        known.update(measured)
        known["commit"] = commit.strip()
        BYTES.write_text(json.dumps(known, indent=1))
        return
    runs = collect([d for d in args.dirs if pathlib.Path(d).exists()])
    if not runs:
        raise SystemExit("no finished runs found")
    summary = summarise(runs)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        compact(runs, args.results)
        (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
        print(table(summary))
        print(f"\nwrote {args.results}/summary.json")
        return
    compact(runs)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))
    plots(runs, summary)
    plot_bytes(summary)
    if args.readmes:
        for path in write_readmes(summary):
            print(f"rewrote the tables in {path.relative_to(ROOT)}")
    print(f"\nwrote {RESULTS}/summary.json, convergence.png, convergence_lr.png, convergence_rank.png, convergence_bytes.png")


if __name__ == "__main__":
    main()
