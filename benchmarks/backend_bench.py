"""The ``torch.compile`` backend on a LLaMA-style stack, against the default ``torch.compile``, one run.

    python benchmarks/backend_bench.py       # 4 blocks, hidden 256, ffn 688, batch 4 x seq 256, fp32, 32 groups
    python benchmarks/backend_bench.py --methods default,velora,random,principal,principal_random,prand-every1
    python benchmarks/backend_bench.py --methods default,random,random-every1 --compile-repeats 0

Each method is the default ``torch.compile`` or ``velora_fx.make_backend(config)``: ``velora`` (``num_groups``),
the token-level estimators at the same bytes (``rank = num_groups``), ``prand-every1`` (``principal_random``
refreshed on every step: what one refresh costs) and ``random-every1`` (``random`` re-seeded on every step).
Figures, as ratios to ``default``:

* bytes kept for backward: distinct storages packed by ``saved_tensors_hooks``
  during the forward of a training step (parameters excluded);
* step time: medians of interleaved training steps (forward + backward);
* compile time: the first training step (compile + calibration) minus the median
  step, each method compiled in a fresh subprocess with an empty Inductor cache (no
  kernel shared between them), medians over ``--compile-repeats`` processes.

The cost of a refresh every ``R`` steps, averaged over a run, is
``(step(prand-every1) - step(principal_random)) / R / step(default)``, printed for R = 100; a re-seed of
``random`` needs no data: ``step(random-every1) / step(random)`` is its cost when done on every step.

Prints a table and JSON (also written to ``benchmarks/out/backend_bench.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import velora_fx  # noqa: E402
from benchmarks.measure import import_compiler, interleaved_medians, saved_bytes  # noqa: E402
from benchmarks.models import commit  # noqa: E402
from tests.backend_models import LlamaStack  # noqa: E402


def _model(args) -> LlamaStack:
    torch.manual_seed(0)
    return LlamaStack(blocks=args.blocks, dim=args.dim, heads=args.heads, hidden=args.ffn)


def _batch(args) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(args.batch, args.seq, args.dim)


def config_for(which: str, groups: int):
    """The ``VeloraConfig`` of a method (``None``: the default backend); ``<method>-b<B>``: under memory budget ``B``
    (``default-b<B>``: the budget alone, nothing compressed)."""
    base, sep, budget = which.rpartition("-b")
    if sep and base and budget.replace(".", "", 1).isdigit():
        cfg = config_for(base, groups) or velora_fx.VeloraConfig(exclude=("*",))
        return dataclasses.replace(cfg, memory_budget=float(budget))
    if which == "default":
        return None
    if which == "velora":
        return velora_fx.VeloraConfig(estimator=velora_fx.Velora(num_groups=groups))
    if which == "prand-every1":
        return velora_fx.VeloraConfig(estimator=velora_fx.PrincipalRandom(rank=groups, refresh_every=1))
    if which == "random-every1":
        return velora_fx.VeloraConfig(estimator=velora_fx.RandomProjection(rank=groups, refresh_every=1))
    if which.startswith("quant"):  # quant<bits>[-g<group size>][-nearest][-down<bits>[h]: down_proj's own bits, rotated]
        bits, *rest = which.removeprefix("quant").split("-")
        group = next((int(r[1:]) for r in rest if r.startswith("g")), 32)
        rounding = "nearest" if "nearest" in rest else "stochastic"
        down = {"*.down_proj.weight": velora_fx.Quantized(int(r[4:].removesuffix("h")), group, rounding,
                                                          "hadamard" if r.endswith("h") else "none")
                for r in rest if r.startswith("down")}  # fmt: skip
        return velora_fx.VeloraConfig(estimator=velora_fx.Quantized(int(bits), group, rounding), overrides=down)
    return velora_fx.VeloraConfig(estimator=which, rank=groups)


def _compiled(model, which: str, args):
    cfg = config_for(which, args.groups)
    if cfg is None:
        return torch.compile(model)
    return torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))


def _step(compiled, model, x):
    def run():
        for p in model.parameters():
            p.grad = None
        compiled(x).float().pow(2).mean().backward()

    return run


def compile_once(which: str, args) -> float:
    """Seconds of the first training step minus the median of the next ones (this process, cold cache)."""
    import_compiler()
    model = _model(args)
    compiled = _compiled(model, which, args)
    x = _batch(args)
    step = _step(compiled, model, x)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    steady = interleaved_medians({which: step}, repeats=5, warmup=1)[which]
    return first - steady


def compile_times(args) -> dict[str, float]:
    out: dict[str, list[float]] = {m: [] for m in args.methods if not m.endswith("-every1")}
    for _ in range(args.compile_repeats):
        for which in out:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                cmd = [sys.executable, __file__, "--compile-only", which, *_shape_args(args)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                out[which].append(float(res.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(v) for k, v in out.items()}


def _shape_args(args) -> list[str]:
    return [f"--{k}={getattr(args, k)}" for k in ("blocks", "dim", "heads", "ffn", "batch", "seq", "groups")]


METHODS = ("default", "velora", "random", "principal", "principal_random", "prand-every1", "random-every1", "quant1", "quant2",
           "quant3", "quant4", "quant8", "quant4-nearest", "quant2-g128", "quant2-g128-down1", "quant2-g128-down1h", "default-b0.3", "velora-b0.3", "quant2-b0.3")


def main() -> None:
    # every method compiles the same model class with its own backend: one recompile each, all kept alive for the
    # interleaved timing; past Dynamo's limit (8) a method would silently run eagerly
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile-repeats", type=int, default=2)
    parser.add_argument("--methods", default="default,velora", help=f"comma-separated, from {METHODS}")
    parser.add_argument("--compile-only", choices=METHODS)
    args = parser.parse_args()
    if args.compile_only:
        print(compile_once(args.compile_only, args))
        return
    args.methods = ["default", *[m for m in args.methods.split(",") if m != "default"]]
    if set(args.methods) - set(METHODS):
        raise SystemExit(f"unknown methods {set(args.methods) - set(METHODS)}; known: {METHODS}")

    compile_s = compile_times(args) if args.compile_repeats else {}
    base = _model(args)
    models = {k: copy.deepcopy(base) for k in args.methods}
    compiled = {k: _compiled(m, k, args) for k, m in models.items()}
    x = _batch(args)
    steps = {k: _step(compiled[k], models[k], x) for k in models}
    for k in steps:  # compile + calibrate
        steps[k]()
    nbytes = {}
    for k in models:
        nbytes[k], loss = saved_bytes(lambda k=k: compiled[k](x).float().pow(2).mean())
        loss.backward()
    times = interleaved_medians(steps, repeats=args.repeats, warmup=2)

    print(
        f"LLaMA-style stack: {args.blocks} blocks, hidden {args.dim}, ffn {args.ffn}, batch {args.batch} x seq "
        f"{args.seq}, fp32, {args.groups} scalars per token; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'method':<18}{'kept MiB':>10}{'bytes x':>9}{'step ms':>10}{'step x':>8}{'compile s':>11}{'compile x':>11}  sites")
    rows = {}
    for k in args.methods:
        rep = velora_fx.report(models[k]) if k != "default" else None
        rows[k] = {
            "bytes": nbytes[k], "bytes_ratio": nbytes[k] / nbytes["default"],
            "step_s": times[k], "step_ratio": times[k] / times["default"],
            "compile_s": compile_s.get(k), "compile_ratio": compile_s[k] / compile_s["default"] if k in compile_s else None,
            "sites": None if rep is None else {"compressed": len(rep.compressed), "skipped": len(rep.skipped)},
        }  # fmt: skip
        r = rows[k]
        comp = "—" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        compx = "—" if r["compile_ratio"] is None else f"{r['compile_ratio']:.3f}"
        sites = "" if r["sites"] is None else f"{r['sites']['compressed']}/{sum(r['sites'].values())}"
        print(f"{k:<18}{r['bytes'] / 2**20:>10.2f}{r['bytes_ratio']:>9.3f}{r['step_s'] * 1e3:>10.1f}"
              f"{r['step_ratio']:>8.3f}{comp:>11}{compx:>11}  {sites}")  # fmt: skip
    if "prand-every1" in rows and "principal_random" in rows:
        per_refresh = times["prand-every1"] - times["principal_random"]
        print(f"one refresh of every principal_random basis: {per_refresh * 1e3:.1f} ms; every 100 steps, averaged: "
              f"{per_refresh / 100 / times['default']:.2%} of a default step")  # fmt: skip
    if "random-every1" in rows and "random" in rows:
        print(f"random re-seeded on every step: {times['random-every1'] / times['random']:.3f}x the step of random "
              f"without re-seeding")  # fmt: skip
    result = {
        "config": {k: getattr(args, k) for k in ("blocks", "dim", "heads", "ffn", "batch", "seq", "groups", "repeats",
                                                 "compile_repeats")},
        "torch": torch.__version__,
        "commit": commit(),
        "methods": rows,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "backend_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
