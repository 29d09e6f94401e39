"""The ``torch.compile`` backend on a LLaMA-style stack, against the default ``torch.compile``, one run.

    python benchmarks/backend_bench.py       # 4 blocks, hidden 256, ffn 688, batch 4 x seq 256, fp32, 32 groups

Figures (ratios velora / default):

* bytes kept for backward: distinct storages packed by ``saved_tensors_hooks``
  during the forward of a training step (parameters excluded);
* step time: medians of interleaved training steps (forward + backward);
* compile time: the first training step minus the median step, each backend
  compiled in a fresh subprocess with an empty Inductor cache (no kernel
  shared between the two), medians over ``--compile-repeats`` processes.

Prints a table and JSON (also written to ``benchmarks/out/backend_bench.json``).
"""

from __future__ import annotations

import argparse
import copy
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
from tests.backend_models import LlamaStack  # noqa: E402


def _model(args) -> LlamaStack:
    torch.manual_seed(0)
    return LlamaStack(blocks=args.blocks, dim=args.dim, heads=args.heads, hidden=args.ffn)


def _batch(args) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(args.batch, args.seq, args.dim)


def _compiled(model, which: str, args):
    if which == "velora":
        return torch.compile(model, backend=velora_fx.make_backend(velora_fx.VeloraConfig(num_groups=args.groups)))
    return torch.compile(model)


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
    out: dict[str, list[float]] = {"default": [], "velora": []}
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


def main() -> None:
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
    parser.add_argument("--compile-only", choices=("default", "velora"))
    args = parser.parse_args()
    if args.compile_only:
        print(compile_once(args.compile_only, args))
        return

    compile_s = compile_times(args)
    base = _model(args)
    models = {"default": base, "velora": copy.deepcopy(base)}
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
    rep = velora_fx.report(models["velora"])

    ratios = {
        "bytes kept for backward": nbytes["velora"] / nbytes["default"],
        "step time (median)": times["velora"] / times["default"],
        "compile time": compile_s["velora"] / compile_s["default"],
    }
    targets = {"bytes kept for backward": 0.70, "step time (median)": 1.05, "compile time": 1.15}
    rows = [
        ("bytes kept for backward", f"{nbytes['default'] / 2**20:.2f} MiB", f"{nbytes['velora'] / 2**20:.2f} MiB"),
        ("step time (median)", f"{times['default'] * 1e3:.1f} ms", f"{times['velora'] * 1e3:.1f} ms"),
        ("compile time", f"{compile_s['default']:.1f} s", f"{compile_s['velora']:.1f} s"),
    ]
    print(
        f"LLaMA-style stack: {args.blocks} blocks, hidden {args.dim}, ffn {args.ffn}, batch {args.batch} x seq "
        f"{args.seq}, fp32, num_groups={args.groups}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'figure':<26}{'default':>14}{'velora':>14}{'ratio':>9}{'target':>9}  ok")
    for name, d, v in rows:
        ok = "yes" if ratios[name] <= targets[name] else "NO"
        print(f"{name:<26}{d:>14}{v:>14}{ratios[name]:>9.3f}{'<= ' + str(targets[name]):>9}  {ok}")
    print(f"sites: {len(rep.compressed)} compressed, {len(rep.skipped)} skipped")
    result = {
        "config": {k: getattr(args, k) for k in ("blocks", "dim", "heads", "ffn", "batch", "seq", "groups", "repeats")},
        "torch": torch.__version__,
        "bytes": nbytes,
        "step_seconds": times,
        "compile_seconds": compile_s,
        "ratios": ratios,
        "targets": targets,
        "sites": {"compressed": len(rep.compressed), "skipped": len(rep.skipped)},
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "backend_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
