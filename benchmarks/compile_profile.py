"""Where a cold compile spends its time, per method: ``backend_bench.py``'s stack compiled once under cProfile.

Run each method in a fresh process with an empty Inductor cache (the command does both)::

    OMP_NUM_THREADS=1 python benchmarks/compile_profile.py --methods default,velora,quant2 --blocks 1

Prints, per method, the seconds of ``backend_bench.py --compile-only`` (the first step and five more) and the
cumulative seconds of the phases of the compile: AOTAutograd's
partition, velora_fx's joint pass (and its ``trace_into``), Inductor's lowering (``GraphLowering.run``), the
scheduler's code generation, the C++ (or Triton) build, and the one-time check of the CPU's vector ISA.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: phase -> (file suffix, function name) of the profiled function whose cumulative time it is
PHASES = {
    "partition (min-cut)": ("torch/_inductor/compile_fx.py", "partition_fn"),
    "velora_fx joint pass": ("passes/joint_graph.py", "__call__"),
    "  of it: trace_into": ("velora_fx/_torch_internals.py", "trace_into"),
    "Inductor lowering": ("torch/_inductor/graph.py", "run"),
    "scheduler codegen": ("torch/_inductor/scheduler.py", "codegen"),
    "  of it: loop bodies": ("torch/_inductor/loop_body.py", "run"),
    "C++ build": ("torch/_inductor/cpp_builder.py", "build"),
    "vector ISA check": ("torch/_inductor/cpu_vec_isa.py", "valid_vec_isa_list"),
}


def profile_one(method: str, blocks: int) -> dict:
    """The first (compiling) step of ``method`` under cProfile, in this process."""
    from benchmarks import backend_bench as bb

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    sys.argv = ["backend_bench.py", "--compile-only", method, f"--blocks={blocks}"]
    bb.main()
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    out = {"total_s": total}
    for phase, (suffix, name) in PHASES.items():
        out[phase] = max((v[3] for (f, _, fn), v in stats.items() if f.endswith(suffix) and fn == name), default=0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="default,velora,quant2")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(profile_one(args.one, args.blocks)))
        return
    rows = {}
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            cmd = [sys.executable, __file__, "--one", method, "--blocks", str(args.blocks)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows[method] = json.loads(res.stdout.strip().splitlines()[-1])
    methods = list(rows)
    print(f"{'phase (cumulative s)':26}" + "".join(f"{m:>12}" for m in methods))
    for phase in ["total_s", *PHASES]:
        print(f"{phase:26}" + "".join(f"{rows[m][phase]:12.1f}" for m in methods))


if __name__ == "__main__":
    main()
