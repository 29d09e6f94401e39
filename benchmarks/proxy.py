"""The one-step proxy: each estimator's weight-gradient error energy against the noise the minibatch already has.

For every linear layer of a model, on real activations, two batches ``b1``, ``b2`` give the exact weight gradients
``dW1 = g1ᵀ x1`` and ``dW2``. Per estimator (the runtime's own code: ``velora_fx.ops``, ``velora_fx.estimators``,
``velora_fx.quantized``; torchao's MX formats beside them where torchao is installed) and ``--draws`` draws of its
random numbers (re-seeds, keys), on ``b2``:

* relative error energy ``E‖dŴ − dW2‖² / ‖dW2‖²`` (for a fixed projection, one draw: its bias);
* its ratio to the minibatch's own noise ``‖dW1 − dW2‖² / (2 ‖dW2‖²)``.

An unbiased estimator whose error energy is a fraction ``r`` of the minibatch noise trains like a batch about
``1 / (1 + r)`` as large; a biased one carries its error into every step. Medians over the layers are printed.
Models: ``minilm`` (the real pretrained all-MiniLM-L6-v2 on real English prose, as ``benchmarks/fidelity.py``),
``llama`` (the study's byte-level ``LlamaForCausalLM`` of ``examples/pretrain_llama.py``, trained exactly for
``--train-steps`` steps first, on the standard library's sources).

    python -m benchmarks.proxy --model minilm                  # ~2 min on 2 cores
    python -m benchmarks.proxy --model llama --train-steps 300 # ~10 min

Writes ``benchmarks/results/proxy_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from velora_fx import RandomProjection, VeloraConfig, ops  # noqa: E402
from velora_fx import quantized as q  # noqa: E402
from velora_fx.estimators import for_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: name -> (kind, settings); 32 scalars per token for the projections, bits per element in the name otherwise
ESTIMATORS = {
    "velora-32": ("velora", 32),
    "random-32": ("random", 32),
    "random-64": ("random", 64),
    **{f"quant{b}": ("quant", (b, 32, True)) for b in (1, 2, 3, 4)},
    "quant4-nearest": ("quant", (4, 32, False)),
    "quant2-g128": ("quant", (2, 128, True)),
    # rotated (randomized Hadamard) before quantizing: Quantized(rotation="hadamard")
    "quant2h": ("quant", (2, 32, True, True)),
    "quant2-g128h": ("quant", (2, 128, True, True)),
    "quant1-g128h": ("quant", (1, 128, True, True)),
    # per-weight sizes: down_proj at 1 bit (VeLoRA's bytes on the study's model), rotated or not
    "quant2-g128-down1": ("quant", {"": (2, 128, True), "down_proj": (1, 128, True)}),
    "quant2-g128-down1h": ("quant", {"": (2, 128, True), "down_proj": (1, 128, True, True)}),
    # torchao's MX formats (OCP Microscaling: one power-of-two scale per 32 elements, round to nearest), if installed
    "mxfp4": ("mx", "float4_e2m1fn_x2"),  # 4.25 bits per element
    "mxfp6_e2m3": ("mx", "fp6_e2m3"),  # 6.25
    "mxfp8_e4m3": ("mx", "float8_e4m3fn"),  # 8.25
}


def _torchao_mx():
    """torchao's ``MXTensor`` or ``None`` (``pip install torchao``: not a dependency of velora_fx)."""
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except ImportError:
        return None
    return MXTensor


def _hooks(linears: dict[str, nn.Linear]):
    xs, gs, handles = {}, {}, []
    for name, mod in linears.items():
        def fwd(m, inputs, output, name=name):
            xs[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            output.register_hook(lambda g: gs.__setitem__(name, g.detach().reshape(-1, g.shape[-1]).double()))
        handles.append(mod.register_forward_hook(fwd))
    return xs, gs, handles


def _capture(linears, step) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    xs, gs, handles = _hooks(linears)
    try:
        step()
    finally:
        for h in handles:
            h.remove()
    return {n: (xs[n], gs[n]) for n in linears}


def minilm_batches(args):
    from benchmarks import fidelity

    model, tok, _ = fidelity.load_minilm()
    model.train()
    linears = fidelity.encoder_linears(model)
    _, pairs = fidelity.text_pairs(2 * args.pairs, args.seed)
    out = []
    for i in range(2):
        batch = pairs[i * args.pairs : (i + 1) * args.pairs]
        out.append(_capture(linears, lambda: fidelity.mnrl_loss(model, tok, batch, 128).backward()))
        model.zero_grad(set_to_none=True)
    return out


def llama_batches(args):
    import pretrain_llama as pl

    class A:  # the study's model and batch
        dim, layers, heads, seq, batch, seed = 384, 4, 6, 128, 8, args.seed

    train, _ = pl.stdlib_corpus()
    model = pl.make_model(A)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, betas=(0.9, 0.95))
    compiled = torch.compile(model)
    for step in range(args.train_steps):
        tokens = pl.batch_at(train, step, A)
        compiled(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for i in range(2):
        tokens = pl.batch_at(train, args.train_steps + i, A)
        out.append(_capture(linears, lambda: model(input_ids=tokens, labels=tokens).loss.backward()))
        model.zero_grad(set_to_none=True)
    return out


def estimate(kind, setting, name: str, x1, x2, g2, draw: int) -> torch.Tensor:
    """One draw of the estimator's ``dŴ`` on batch 2 (VeLoRA's ``v`` calibrated on batch 1, then fixed)."""
    if kind == "velora":
        d = -(-x2.shape[-1] // setting)
        v = ops.initial_direction(x1.float(), d, name).double()
        x_hat = ops.reconstruct(ops.project(x2, v), v, x2.shape[-1])
    elif kind == "random":
        est = for_config(VeloraConfig(estimator=RandomProjection(rank=setting)))
        shape, _ = est.basis_shape(x2.shape[-1])
        basis = (est.initial(shape, name)[0] if draw == 0 else est.refreshed(torch.empty(shape), None, 0, name, draw)).double()  # fmt: skip
        x_hat = ops.reconstruct(ops.project(x2, basis), basis, x2.shape[-1])
    elif kind == "mx":
        elem = getattr(torch, setting, setting)  # a torch dtype, or torchao's name of an fp6 format
        x_hat = _torchao_mx().to_mx(x2.float(), elem, 32).dequantize(torch.float32).double()
    else:
        if isinstance(setting, dict):  # per-weight: the entry whose key is in the name, else ""'s
            setting = next((v for k, v in setting.items() if k and k in name), setting[""])
        bits, group, stochastic, *rotated = setting
        key = q.key_for(0, name, draw)
        codes, scales = q.encode(x2.float(), key, bits, group, stochastic, bool(rotated))
        x_hat = q.decode(codes, scales, bits, group, x2.shape[-1], torch.float64, key if rotated else None)
    return g2.t() @ x_hat


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    (b1, b2) = minilm_batches(args) if args.model == "minilm" else llama_batches(args)
    estimators = {e: ks for e, ks in ESTIMATORS.items() if ks[0] != "mx" or _torchao_mx() is not None}
    if len(estimators) < len(ESTIMATORS):
        print("torchao is not installed: its MX formats are left out (pip install torchao)", file=sys.stderr)
    layers = {}
    for name in b1:
        (x1, g1), (x2, g2) = b1[name], b2[name]
        if x2.shape[-1] < 64:
            continue
        dw1, dw2 = g1.t() @ x1, g2.t() @ x2
        energy = float(dw2.pow(2).sum())
        row = {"D": x2.shape[-1], "noise": float((dw1 - dw2).pow(2).sum()) / (2 * energy)}
        for est, (kind, setting) in estimators.items():
            draws = 1 if kind in ("velora", "mx") or (kind == "quant" and isinstance(setting, tuple) and not setting[2]) else args.draws
            errs = [float((estimate(kind, setting, name, x1, x2, g2, i) - dw2).pow(2).sum()) / energy for i in range(draws)]
            row[est] = sum(errs) / len(errs)
        layers[name] = row
    summary = {}
    for est in estimators:
        summary[est] = {"rel_err2": statistics.median(r[est] for r in layers.values()),
                        "per_noise": statistics.median(r[est] / r["noise"] for r in layers.values())}  # fmt: skip
        down = [r for n, r in layers.items() if "down_proj" in n]
        if down:  # the MLP's widest input, the product of two activations: where rotation pays
            summary[est]["down_proj_per_noise"] = statistics.median(r[est] / r["noise"] for r in down)
    summary["noise"] = statistics.median(r["noise"] for r in layers.values())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"model": args.model, "commit": commit, "args": vars(args), "summary": summary, "layers": layers}


def table(result: dict) -> str:
    s = result["summary"]
    lines = [f"{result['model']}: {len(result['layers'])} linears, minibatch noise (median) {s['noise']:.3g}",
             "| estimator | rel. error² (median) | / minibatch noise (median) | / noise, down_proj (median) |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {e} | {s[e]['rel_err2']:.3g} | {s[e]['per_noise']:.3g} | {s[e].get('down_proj_per_noise', float('nan')):.3g} |"
              for e in ESTIMATORS if e in s]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("minilm", "llama"), default="minilm")
    p.add_argument("--pairs", type=int, default=16, help="minilm: sentence pairs per batch")
    p.add_argument("--train-steps", type=int, default=300, help="llama: exact training steps before measuring")
    p.add_argument("--draws", type=int, default=8, help="draws of each random estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"proxy_{args.model}.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
