"""How many kernels Inductor generates for one training step of one LLaMA block, per method.

    python benchmarks/kernel_count.py                                   # ~1 min on CPU (C++ kernels)
    python benchmarks/kernel_count.py --device cuda --dump /tmp/kernels # Triton kernels; each method's source kept

One block (hidden 64, FFN 96, SDPA): three compressed inputs (q/k/v's, gate/up's, down's; ``o_proj``'s input is
kept for attention anyway). Counts the kernels in the generated source of the forward and backward graphs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import velora_fx  # noqa: E402
from tests.backend_models import LlamaStack  # noqa: E402
from tests.helpers import generated_code  # noqa: E402

METHODS = {
    "default": None,
    "velora": velora_fx.VeloraConfig(),
    **{f"quant{b}": velora_fx.VeloraConfig(estimator=velora_fx.Quantized(bits=b)) for b in (1, 2, 3, 4, 8)},
    "quant2h": velora_fx.VeloraConfig(estimator=velora_fx.Quantized(bits=2, rotation="hadamard")),  # every input rotated
    **{f"quant{b}n": velora_fx.VeloraConfig(estimator=velora_fx.Quantized(bits=b, rounding="nearest")) for b in (2, 4)},
}


def kernels(config, device: str = "cpu", dump: Path | None = None, name: str = "") -> int:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = velora_fx.prepare(LlamaStack(blocks=1, dim=64, heads=2, hidden=96)).to(device)
    compiled = torch.compile(model, backend=velora_fx.make_backend(config)) if config else torch.compile(model)
    x = torch.randn(2, 16, 64, device=device)
    sources = generated_code(lambda: compiled(x).pow(2).mean().backward())
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.py").write_text("\n\n# ---- next graph ----\n\n".join(sources))
    return sum(len(re.findall(r"cpp_fused_\w+ = async_compile|def triton_\w+\(", src)) for src in sources)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dump", type=Path, default=None, help="write each method's generated source here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    counts = {name: kernels(cfg, args.device, args.dump, name) for name, cfg in METHODS.items()}
    for name, n in counts.items():
        print(f"{name}: {n} kernels ({n - counts['default']:+d} vs default; 3 compressed inputs) on {args.device}")
