"""What compiling the quantized codec costs with static sizes (one kernel per input width, as the backend
compiles it) against dynamic sizes (one kernel for every width), alone, cold.

    OMP_NUM_THREADS=1 python benchmarks/codec_compile.py                     # widths 256, 688: backend_bench's stack
    OMP_NUM_THREADS=1 python benchmarks/codec_compile.py --widths 256,512    # widths a dynamic kernel can share

Each mode runs in a fresh process with an empty Inductor cache and one compile thread (so that every C++ build
runs in the process, where it is timed). It first compiles a trivial function (Inductor's one-time CPU probes,
not counted), then compiles ``quantized.encode_record`` and ``decode_record`` (2 bits, groups of 32, stochastic;
1024 tokens) with ``torch.compile(dynamic=False)`` or ``dynamic=True`` and calls each at every width: the seconds of
each first call (Dynamo, AOTAutograd, Inductor and gcc: what a compile adds), the C++ builds and their seconds,
the graphs compiled, then the steady per-call time. The two modes' records and ``x̂`` are compared bit for bit.

The backend compiles the codec into the model's graphs instead (``GraphWriter.shared``), static, once per
distinct width: what is measured here is whether one dynamic kernel per codec would cost less (the question
``benchmarks/README.md``, "Compile time", answers with these figures).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor import cpp_builder

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from velora_fx import quantized as q  # noqa: E402

TOKENS = 1024


def measure(dynamic: bool, widths: list[int]) -> dict:
    inductor_config.compile_threads = 1
    builds: list[float] = []
    build = cpp_builder.CppBuilder.build

    def timed_build(self):
        start = time.perf_counter()
        build(self)
        builds.append(time.perf_counter() - start)

    cpp_builder.CppBuilder.build = timed_build
    torch.compile(lambda x: x.sin() + 1)(torch.randn(64))  # Inductor's one-time probes, not counted
    builds.clear()
    graphs_before = counters["stats"]["unique_graphs"]

    key = q.key_for(0, "w", 1)
    encode = torch.compile(lambda x, k: q.encode_record(x, k, 2, 32, True), dynamic=dynamic, fullgraph=True)
    decode = torch.compile(lambda r, f: q.decode_record(r, 2, 32, f, torch.float32), dynamic=dynamic, fullgraph=True)
    result: dict = {"first_call_s": {}, "per_call_us": {}, "values": {}}
    calls = {}

    def first_call(label, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        result["first_call_s"][label] = time.perf_counter() - start
        result["values"][label] = out
        calls[label] = (fn, args)
        return out

    torch.manual_seed(0)
    for width in widths:
        record = first_call(f"encode {width}", encode, torch.randn(TOKENS, width), key)
        first_call(f"decode {width}", decode, record, width)
    for label, (fn, args) in calls.items():
        for _ in range(5):
            fn(*args)
        start = time.perf_counter()
        for _ in range(50):
            fn(*args)
        result["per_call_us"][label] = (time.perf_counter() - start) / 50 * 1e6
    result["builds"] = len(builds)
    result["build_s"] = sum(builds)
    result["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
    result["total_first_calls_s"] = sum(result["first_call_s"].values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="256,688")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the JSON here")
    parser.add_argument("--one", choices=("static", "dynamic"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    if args.one:
        r = measure(args.one == "dynamic", widths)
        values = r.pop("values")
        torch.save(values, os.environ["CODEC_COMPILE_VALUES"])
        print(json.dumps(r))
        return
    results, values = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("static", "dynamic"):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, mode),
                       CODEC_COMPILE_VALUES=os.path.join(tmp, f"{mode}.pt"))  # fmt: skip
            cmd = [sys.executable, __file__, "--one", mode, f"--widths={args.widths}"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            values[mode] = torch.load(os.path.join(tmp, f"{mode}.pt"))
    identical = all(torch.equal(values["static"][k], values["dynamic"][k]) for k in values["static"])
    for mode, r in results.items():
        firsts = ", ".join(f"{k} {v:.2f}" for k, v in r["first_call_s"].items())
        print(f"{mode}: first calls {r['total_first_calls_s']:.2f} s ({firsts}); {r['graphs']} graphs, "
              f"{r['builds']} C++ builds, {r['build_s']:.2f} s")  # fmt: skip
    for label in results["static"]["per_call_us"]:
        s, d = results["static"]["per_call_us"][label], results["dynamic"]["per_call_us"][label]
        print(f"  {label}: {s:.0f} us static, {d:.0f} us dynamic ({d / s:.2f}x)")
    print(f"records and x_hat bit-identical across modes: {identical}")
    report = {"command": " ".join(["python", "benchmarks/codec_compile.py", f"--widths {args.widths}"]),
              "torch": torch.__version__, "threads": os.environ.get("OMP_NUM_THREADS"), "tokens": TOKENS,
              "bit_identical": identical, **results}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
