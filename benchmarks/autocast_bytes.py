"""Bytes kept for backward by ``backend_bench.py``'s LLaMA stack, in float32 and under CPU bfloat16 autocast.

    OMP_NUM_THREADS=1 python benchmarks/autocast_bytes.py --methods default,velora,quant2,quant4-nearest

Under autocast the quantizer reads bfloat16 inputs, which the min-cut partitioner may recompute in backward from
values it keeps anyway: this is how NOTE [a shared encode is never recomputed] (``velora_fx/codec.py``) was
measured (2 blocks, batch 2 × 128 by default; one process, each method compiled in turn).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import benchmarks.backend_bench as bb  # noqa: E402
from benchmarks.measure import saved_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="default,velora,quant2,quant4-nearest")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    cli = parser.parse_args()
    args = argparse.Namespace(blocks=cli.blocks, dim=256, heads=4, ffn=688, batch=cli.batch, seq=cli.seq, groups=32)
    x = bb._batch(args)
    print(f"{'method':<20}{'fp32 bytes':>14}{'bf16 autocast bytes':>22}")
    for which in cli.methods.split(","):
        kept = []
        for autocast in (False, True):
            torch._dynamo.reset()
            model = bb._model(args)
            compiled = bb._compiled(model, which, args)

            def loss(compiled=compiled, autocast=autocast):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    return compiled(x).float().pow(2).mean()

            loss().backward()  # compile (and calibrate)
            kept.append(saved_bytes(loss)[0])
        print(f"{which:<20}{kept[0]:>14,}{kept[1]:>22,}", flush=True)


if __name__ == "__main__":
    main()
