"""velora_fx against its peers on one CUDA GPU (issue #4, part 1; the CPU version is benchmarks/peers.py).

    python benchmarks/gpu.py                       # LLaMA h1024 x 8 layers, batch 4 x seq 1024, fp32
    python benchmarks/gpu.py --bf16                # the same under torch.autocast(bfloat16)
    python benchmarks/gpu.py --models llama,gpt2,vit --sizes 1024x8,2048x8 --seqs 1024,2048 --all-methods
    python benchmarks/gpu.py --dry-run             # no GPU: tiny sizes on the CPU, eager methods only

All methods of one (model, shape) live in ONE process, built from the same seed on the same batch:

* ``peak_mib``: ``torch.cuda.max_memory_allocated`` during one steady training step, minus what was
  allocated before it (activations, gradients and temporaries of that step; parameters excluded);
* ``kept_mib``: bytes kept for backward (``benchmarks.measure.saved_bytes``, parameters excluded);
* ``tok/s`` and ``step ×``: from the medians of interleaved steps (synchronised), ratio to ``compile``
  (LoRA rows: to ``lora-compile``);
* ``compile_s``: first step minus the median step (this process; Inductor's cache as the machine has it);
* ``loss@1``: loss of the first step (VeLoRA changes only dW: every method must agree).

Models and batches: ``benchmarks/models.py``, shared with ``peers.py`` (heads of 32, FFN rounded to a multiple
of 8, ViT 8x8 patches and 10 classes). The GPU results recorded before it was shared
(``benchmarks/results/gpu_*.json``) used heads of 64, FFN rounded to 128, ViT 16x16 patches and 1000 classes.

Methods are those of ``benchmarks/peers.py``; the default set leaves out the num_groups sweep
(``--all-methods`` adds it back). Prints a table and writes JSON (``--out``, default
``benchmarks/results/gpu.json``; each finished method is also printed as a JSON line, so a run cut short
still leaves its figures).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import commit, make_batch, make_model, tokens_per_sample  # noqa: E402
from benchmarks.peers import (  # noqa: E402
    ESTIMATOR_METHODS,
    LORA_TARGETS,
    distinct_class,
    methods_for,
    reference_for,
    velora_config_for,
)

DEFAULT_METHODS = [
    "eager", "compile", "velora-g32", "velora-paper", *ESTIMATOR_METHODS, "ckpt-compile",
    "budget-0.5", "budget-0.3", "budget-0.2", "velora-g32-b0.5", "velora-g32-b0.3", "velora-g32-b0.2",
    "lora-compile", "lora-peft-velora", "lora-velora_fx",
]  # fmt: skip
EAGER = ("eager", "ckpt-eager", "lora-eager", "lora-peft-velora")


class Method:
    def __init__(self, name: str, kind: str, shape: dict, args):
        import torch

        import velora_fx

        self.name, self.kind, self.device = name, kind, args.device
        model = make_model(kind, shape["hidden"], shape["layers"], shape["seq"], args.vocab)
        if name.startswith("lora"):
            import peft

            vcfg = peft.VeloraConfig(num_groups=32, init_type="batch_average_once") if "peft-velora" in name else None
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules=LORA_TARGETS, velora_config=vcfg))  # fmt: skip
        if name.startswith("ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = distinct_class(model.to(args.device).train(), name)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.patch = float(name.split("-")[1]) if name.startswith("budget-") else None
        cfg = velora_config_for(name, kind)
        if name in EAGER:
            self.fn = self.model
        elif cfg is not None:
            self.fn = torch.compile(velora_fx.prepare(self.model), backend=velora_fx.make_backend(cfg))
        else:
            self.fn = torch.compile(self.model)
        self.batch = make_batch(kind, shape["batch"], shape["seq"], args.vocab, args.device)
        self.bf16 = args.bf16

    def forward(self):
        import torch

        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            return self.fn(**self.batch).loss

    def step(self):
        for p in self.params:
            p.grad = None
        loss = self.forward()
        loss.backward()
        return loss

    def synced_step(self):
        self.step()
        _sync(self.device)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure_shape(kind: str, shape: dict, methods: list[str], args) -> list[dict]:
    import torch

    import velora_fx
    from benchmarks.measure import interleaved_medians, saved_bytes

    rows, live = [], {}
    for name in methods:
        row = {"model": kind, **shape, "method": name, "dtype": "bf16-autocast" if args.bf16 else "fp32"}
        try:
            m = Method(name, kind, shape, args)
            _sync(args.device)
            start = time.perf_counter()
            if m.patch is not None:
                with torch._functorch.config.patch(activation_memory_budget=m.patch):
                    loss = m.step()
            else:
                loss = m.step()
            _sync(args.device)
            row["first_step_s"] = time.perf_counter() - start
            row["loss1"] = float(loss.detach())
            for p in m.params:
                p.grad = None
            nbytes, out = saved_bytes(m.forward)
            out.backward()
            row["kept_bytes"] = nbytes
            for p in m.params:
                p.grad = None
            if args.device == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                m.synced_step()
                row["peak_step_bytes"] = torch.cuda.max_memory_allocated() - before
            steady = statistics.median(_time(m.synced_step) for _ in range(3))
            row["compile_s"] = None if name in EAGER else row["first_step_s"] - steady
            rep = velora_fx.report(m.model)
            row["sites"] = f"{len(rep.compressed)}/{len(rep)}" if len(rep) else ""
            for p in m.params:
                p.grad = None
            live[name] = m
        except Exception as e:  # noqa: BLE001 - a failing method is a result
            import traceback

            row["error"] = f"{type(e).__name__}: " + " | ".join(l.strip() for l in str(e).splitlines() if l.strip())[:600]
            row["traceback"] = traceback.format_exc()[-3000:]
        rows.append(row)
        print("@@row " + json.dumps(row), flush=True)
    times = interleaved_medians({k: m.synced_step for k, m in live.items()}, repeats=args.repeats, warmup=1)
    tokens = shape["batch"] * tokens_per_sample(kind, shape["seq"])
    for r in rows:
        if r["method"] in times:
            r["step_s"] = times[r["method"]]
            r["tokens_per_s"] = tokens / times[r["method"]]
    by = {r["method"]: r for r in rows}
    for r in rows:
        ref = by.get(reference_for(r["method"]), {})
        for key, out in (("kept_bytes", "kept_ratio"), ("peak_step_bytes", "peak_ratio"), ("step_s", "step_ratio"),
                         ("compile_s", "compile_ratio")):  # fmt: skip
            a, b = r.get(key), ref.get(key)
            r[out] = a / b if a is not None and b else None
    return rows


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _f(x, spec="{:.2f}"):
    return "—" if x is None else spec.format(x)


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["model", "shape", "method", "kept MiB", "kept ×", "peak MiB", "peak ×", "tok/s", "step ×",
            "compile s", "compile ×", "loss@1", "sites", "note"]  # fmt: skip
    body = []
    for r in rows:
        body.append([
            r["model"], f"h{r['hidden']}xL{r['layers']} b{r['batch']}xs{r['seq']}", r["method"],
            _f(r.get("kept_bytes") and r["kept_bytes"] / 2**20, "{:.0f}"), _f(r.get("kept_ratio")),
            _f(r.get("peak_step_bytes") and r["peak_step_bytes"] / 2**20, "{:.0f}"), _f(r.get("peak_ratio")),
            _f(r.get("tokens_per_s"), "{:.0f}"), _f(r.get("step_ratio")), _f(r.get("compile_s"), "{:.1f}"),
            _f(r.get("compile_ratio")), _f(r.get("loss1"), "{:.4f}"), r.get("sites", ""), (r.get("error") or "")[:80],
        ])  # fmt: skip
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(map(str, b)) + " |" for b in body])  # fmt: skip
    widths = [max(len(h), *(len(str(b[i])) for b in body)) if body else len(h) for i, h in enumerate(head)]
    return "\n".join(["  ".join(h.ljust(w) for h, w in zip(head, widths))] +
                     ["  ".join(str(c).ljust(w) for c, w in zip(b, widths)) for b in body])  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama")
    ap.add_argument("--sizes", default="1024x8", help="hidden x layers, comma separated")
    ap.add_argument("--seqs", default="1024")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bf16", action="store_true", help="torch.autocast(cuda, bfloat16) around the forward")
    ap.add_argument("--methods", default=None, help="comma-separated; default: " + ",".join(DEFAULT_METHODS))
    ap.add_argument("--all-methods", action="store_true", help="every method of peers.py, num_groups sweep included")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, eager methods: checks the script runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.sizes, args.seqs, args.batch, args.vocab, args.repeats = "64x1", "32", 2, 256, 2
        args.methods = args.methods or "eager,ckpt-eager,lora-eager,lora-peft-velora"
        args.bf16 = False
        if args.out == ap.get_default("out"):
            args.out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "velora_gpu_dry_run.json")
    else:
        args.device = "cuda"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    measured_at = commit()  # at the start: the code that runs, whatever HEAD is when the run ends
    import torch

    from benchmarks.measure import import_compiler

    import_compiler()  # not inside the first compiled method's compile time

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use benchmarks/peers.py on a CPU, or --dry-run to check this script.", file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows: list[dict] = []
    for kind in args.models.split(","):
        if args.all_methods:
            methods = methods_for(kind)
        else:
            wanted = args.methods.split(",") if args.methods else DEFAULT_METHODS
            methods = [m for m in wanted if m in methods_for(kind)]
        for size in args.sizes.split(","):
            hidden, layers = (int(v) for v in size.split("x"))
            for seq in (int(s) for s in args.seqs.split(",")):
                shape = dict(hidden=hidden, layers=layers, seq=seq, batch=args.batch)
                rows += measure_shape(kind, shape, methods, args)
    elapsed = time.perf_counter() - started
    meta = {
        "commit": measured_at,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
        "bf16": args.bf16,
        "vocab": args.vocab,
        "repeats": args.repeats,
        "wall_seconds": elapsed,
    }
    print(table(rows))
    print(f"\n{meta['device']}, torch {meta['torch']}; wall {elapsed:.0f} s")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
