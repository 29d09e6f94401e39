"""Where the compile time of ``backend_bench.py``'s stack goes, per method: a cold first training step, by phase.

    OMP_NUM_THREADS=1 python benchmarks/compile_breakdown.py --methods default,quant2,quant4-nearest

Each method runs in a fresh process with an empty Inductor cache (as ``backend_bench.py`` times compiles) and
prints its first step's seconds, then the seconds spent in a few compiler functions (wrapped by this script, so
inclusive and overlapping: ``compile_to_module`` holds the code generation, which holds the kernels'), and the
C++ kernels Inductor generated: how many, their code generation's total, the slowest, and how many of its
outer-loop fusions failed their loop-level check (each such kernel is generated twice: once fused, then again
as separate loops); the ops its code generator emitted (each op of a kernel's loop body, once per variant:
scalar, vector, vector tail), in all and in the biggest kernel — what the code generation's time follows; and the
C++ builds (gcc, one per distinct kernel source) with their seconds: each process compiles with one compile
thread, so that every build runs in it, one after the other, and is timed. The first kernel of every process
also pays Inductor's one-time probe of the CPU's vector ISA (about 7 s here, a few builds): compare methods by
the totals' differences. Reads Inductor's internals (benchmark only).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (module, qualified name) of the functions timed, outermost first
PHASES = [
    ("torch._functorch.partitioners", "solve_min_cut"),
    ("velora_fx.passes.joint_graph", "velora_joint_pass"),
    ("torch._inductor.graph", "GraphLowering.run"),
    ("torch._inductor.scheduler", "Scheduler.__init__"),
    ("torch._inductor.graph", "GraphLowering.compile_to_module"),
    ("torch._inductor.scheduler", "Scheduler.codegen"),
]


def _wrap(owner, name: str, record) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(time.perf_counter() - start)

    setattr(owner, name, timed)


def measure(which: str, args) -> dict:
    """One cold first step of ``which`` in this process, broken down."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpp_builder, metrics
    from torch._inductor.codegen import common, cpp

    inductor_config.compile_threads = 1  # every C++ build in this process (timed below), none in a worker pool

    import benchmarks.backend_bench as bb
    from benchmarks.measure import import_compiler

    phases: dict[str, float] = collections.defaultdict(float)
    for module, qual in PHASES:
        owner = importlib.import_module(module)
        *path, name = qual.split(".")
        for part in path:
            owner = getattr(owner, part)
        _wrap(owner, name, lambda dt, q=qual: phases.__setitem__(q, phases[q] + dt))
    kernels: list[float] = []
    outer = {"attempted": 0, "failed": 0}
    ops = {"all": 0, "biggest kernel": 0}
    emit = common.CSEProxy._default  # every op a kernel's body emits passes through here

    def counted_op(self, name, args, kwargs):
        ops["all"] += 1
        return emit(self, name, args, kwargs)

    common.CSEProxy._default = counted_op
    generate = cpp.CppScheduling.codegen_node

    def generated(self, node):
        before, start = ops["all"], time.perf_counter()
        result = generate(self, node)
        kernels.append(time.perf_counter() - start)
        ops["biggest kernel"] = max(ops["biggest kernel"], ops["all"] - before)
        return result

    cpp.CppScheduling.codegen_node = generated
    original = cpp.CppScheduling.codegen_outer_loop_node

    def counted(self, node):
        before = len(metrics.cpp_outer_loop_fused_inner_counts)  # a fusion that passes its check appends here
        result = original(self, node)
        outer["attempted"] += 1
        outer["failed"] += len(metrics.cpp_outer_loop_fused_inner_counts) == before
        return result

    cpp.CppScheduling.codegen_outer_loop_node = counted
    builds: list[float] = []
    _wrap(cpp_builder.CppBuilder, "build", builds.append)

    import_compiler()
    model = bb._model(args)
    step = bb._step(bb._compiled(model, which, args), model, bb._batch(args))
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    kernels.sort(reverse=True)
    return {"first_step_s": first, "phases_s": dict(phases), "kernels": len(kernels), "kernel_codegen_s": sum(kernels),
            "slowest_kernels_s": kernels[:3], "outer_loop_fusions": outer, "ops_emitted": ops,
            "cpp_builds": len(builds), "cpp_build_s": sum(builds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="default,quant2")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one method, JSON on stdout
    args = parser.parse_args()
    shape = argparse.Namespace(blocks=args.blocks, dim=256, heads=4, ffn=688, batch=4, seq=256, groups=32)
    if args.one:
        print(json.dumps(measure(args.one, shape)))
        return
    results = {}
    for which in args.methods.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            cmd = [sys.executable, __file__, "--one", which, f"--blocks={args.blocks}"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[which] = json.loads(out.strip().splitlines()[-1])
    for which, r in results.items():
        o, e = r["outer_loop_fusions"], r["ops_emitted"]
        print(f"{which}: first step {r['first_step_s']:.1f} s; {r['kernels']} kernels, code generation "
              f"{r['kernel_codegen_s']:.1f} s (slowest {', '.join(f'{t:.2f}' for t in r['slowest_kernels_s'])}); "
              f"outer-loop fusions {o['attempted']}, {o['failed']} failed and generated again; "
              f"{e['all']} ops emitted, {e['biggest kernel']} by the biggest kernel; "
              f"{r['cpp_builds']} C++ builds, {r['cpp_build_s']:.1f} s")  # fmt: skip
        for qual, secs in r["phases_s"].items():
            print(f"    {qual:40s} {secs:6.2f} s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
