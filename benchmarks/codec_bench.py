"""What the quantized codec costs by itself, compiled, beside the matmul it serves: one input of ``N × D``.

    OMP_NUM_THREADS=1 python benchmarks/codec_bench.py                 # N 1024, D 384, groups of 32, 1-4 bits
    OMP_NUM_THREADS=1 python benchmarks/codec_bench.py --tokens 1024 --features 688 --out-features 256

Each function is compiled alone (``torch.compile``, Inductor) and timed by interleaved medians:

* ``matmul``: ``x @ W`` with ``W`` of ``D × out_features``, the forward matmul of the linear whose input this is
  (its ``dW`` in backward is a matmul of the same size);
* ``encode``: ``quantized.encode_record(x, ...)``, the forward's quantize and pack (stochastic rounding);
* ``encode-nearest``: the same without the hash's uniforms;
* ``uniforms``: the counter hash alone, one uniform per element;
* ``decode``: ``quantized.decode_record``, what backward runs before its ``dW`` matmul.

Prints microseconds and each as a fraction of ``matmul``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.measure import interleaved_medians  # noqa: E402
from velora_fx import quantized as q  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--out-features", type=int, default=384)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--bits", default="1,2,3,4")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    n, d, g = args.tokens, args.features, args.group_size
    x = torch.randn(n, d)
    w = torch.randn(d, args.out_features)
    key = q.key_for(0, "w", 1)
    print(f"N {n}, D {d}, out {args.out_features}, groups of {g}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'bits':>4}{'function':>16}{'us':>10}{'/ matmul':>10}")
    for bits in (int(b) for b in args.bits.split(",")):
        record = q.encode_record(x, key, bits, g, True)
        fns = {
            "matmul": (torch.compile(torch.matmul), (x, w)),
            "encode": (torch.compile(lambda x, k: q.encode_record(x, k, bits, g, True)), (x, key)),
            "encode-nearest": (torch.compile(lambda x, k: q.encode_record(x, k, bits, g, False)), (x, key)),
            "uniforms": (torch.compile(q.uniforms), (key, x)),
            "decode": (torch.compile(lambda r: q.decode_record(r, bits, g, d, torch.float32)), (record,)),
        }  # fmt: skip

        def timed(fn, a):
            def run():
                for _ in range(10):
                    fn(*a)
            return run

        medians = interleaved_medians({k: timed(*v) for k, v in fns.items()}, repeats=args.repeats, warmup=2)
        for name, s in medians.items():
            print(f"{bits:>4}{name:>16}{s / 10 * 1e6:>10.0f}{s / medians['matmul']:>10.2f}")


if __name__ == "__main__":
    main()
