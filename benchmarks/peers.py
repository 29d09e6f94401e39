"""velora_fx against its peers on HF models with random weights (issue #4, part 1).

    python benchmarks/peers.py --quick     # LLaMA, GPT-2, ViT at one size and one sequence length
    python benchmarks/peers.py             # 2 sizes x 2 sequence lengths (flags: --sizes, --seqs, --models, ...)

Same model, same batch, every method side by side:

* ``eager``, ``compile`` (default ``torch.compile``);
* ``velora-g{8,16,32,64}``: ``torch.compile(backend=velora_fx.make_backend(VeloraConfig(num_groups=g)))``;
* ``velora-g32-b{0.5,0.3,0.2}``: the same under a memory budget (``VeloraConfig(memory_budget=b)``): VeLoRA
  composed with the partitioner's recomputation, one knob; ``exact-b{0.5,0.3,0.2}``: the budget alone through
  velora_fx's backend, nothing compressed (``exclude=("*",)``): the budget scoped to the backend, which a
  recompile cannot lose (the global flag of ``budget-*`` is lost when Dynamo recompiles after the first call:
  measured on ViT);
* ``velora-paper``: the paper's policy (value and down projections only, 32 groups; GPT-2 / ViT: the
  equivalent names, see ``PAPER_POLICY``);
* exact peers: ``ckpt-eager`` / ``ckpt-compile`` (``model.gradient_checkpointing_enable()``, non-reentrant),
  ``budget-0.5`` / ``budget-0.3`` / ``budget-0.2`` (``torch._functorch.config.activation_memory_budget``,
  patched around the compile and the first call);
* LoRA on the LLaMA (PEFT, r=8, q/k/v/o/gate/up/down): ``lora-eager``, ``lora-compile``, PEFT's own VeLoRA
  (``LoraConfig(velora_config=peft.VeloraConfig(num_groups=32, init_type="batch_average_once"))``, eager and
  compiled), and ``lora-velora_fx`` (default ``torch.compile`` of the PEFT model with ``velora_fx.backend``).

Figures per (model, shape, method), each from the process that measures it:

* ``bytes``: distinct non-parameter storages packed by ``saved_tensors_hooks`` during the forward of a
  training step (``benchmarks.measure.saved_bytes``), after the first (compiling, calibrating) step;
* ``loss1``: the loss of the first step (every method must agree: VeLoRA changes only dW);
* ``step``: the median of interleaved training steps (forward + backward) of ALL methods of one
  (model, shape) in ONE process; reported as a ratio to ``compile`` (LoRA rows: to ``lora-compile``);
* ``compile_s``: first step minus the median step, in a FRESH process per method (``--fresh``), with the
  FX-graph and AOTAutograd caches off but the C++ kernel cache warm (the shape process built the kernels):
  the compiler pipeline's time without the C++ compiler (see the README: with a cold kernel cache a compile
  costs 1-2 minutes of g++ on this machine and the run would not fit its budget);
* ``rss_mb``: peak RSS (``ru_maxrss``) of that fresh process, and ``step_rss_mb``: the rise of the
  resident high-water mark over one steady training step (``/proc/self/clear_refs`` reset first).

Every process runs torch with ONE thread (``OMP_NUM_THREADS=1``): on this shared 2-core machine two OpenMP
threads spin against the other jobs and a step gets ~30x slower.

Models and batches: ``benchmarks/models.py`` (shared with ``gpu.py``; its docstring gives the shape).

Writes ``benchmarks/results/peers.json``, ``peers_pareto.png``, ``peers_groups.png`` and prints a table; the
JSON's ``meta.commit`` is the commit measured (``$VELORA_COMMIT`` where the tree has no ``.git``).
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# imports no torch: this process orchestrates the workers, which import it
from benchmarks.models import commit, make_batch, make_model  # noqa: E402

FULL_METHODS = [
    "eager", "compile", "velora-g8", "velora-g16", "velora-g32", "velora-g64", "velora-paper",
    "velora-g32-b0.5", "velora-g32-b0.3", "velora-g32-b0.2", "velora-random", "velora-principal", "velora-prand",
    "ckpt-eager", "ckpt-compile", "budget-0.5", "budget-0.3", "budget-0.2", "exact-b0.5", "exact-b0.3", "exact-b0.2",
]  # fmt: skip
#: the quantized estimator (groups of 32), alone and under the memory budget beside VeLoRA's and plain compile's
QUANT_METHODS = ["velora-q2", "velora-q3", "velora-q4", "velora-q2-b0.3"]
LORA_METHODS = ["lora-eager", "lora-compile", "lora-peft-velora", "lora-peft-velora-compile", "lora-velora_fx"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: The paper's policy (LLaMA: value and down projections), and the nearest equivalent names elsewhere.
PAPER_POLICY = {
    "llama": dict(include=("*.v_proj.weight", "*.down_proj.weight")),
    # GPT-2 fuses q, k, v into one Conv1D ``c_attn`` (one input): the value projection cannot be taken alone.
    "gpt2": dict(include=("*.attn.c_attn.weight", "*.mlp.c_proj.weight")),
    # transformers >= 5 names them attention.v_proj / mlp.fc2; older releases attention.attention.value and
    # output.dense, whose pattern also matches "attention.output.dense" (fnmatch's * crosses dots): excluded.
    "vit": dict(include=("*.attention.v_proj.weight", "*.mlp.fc2.weight",
                         "*.attention.attention.value.weight", "*.output.dense.weight"),
                exclude=("*.attention.output.dense.weight",)),
}  # fmt: skip


ESTIMATOR_METHODS = {"velora-random": "random", "velora-principal": "principal", "velora-prand": "principal_random"}


def velora_config_for(name: str, kind: str):
    """The ``VeloraConfig`` of a velora_fx method (``None`` for any other method).

    ``velora-g{G}`` (VeLoRA, ``G`` groups), ``velora-g{G}-b{B}`` (under memory budget ``B``), ``velora-paper``,
    ``velora-random`` / ``velora-principal`` / ``velora-prand`` (the token-level estimators at 32 scalars per
    token, refreshed every 100 steps where they refresh), ``velora-q{bits}[-b{B}]`` (the quantized estimator, groups
    of 32, optionally under memory budget ``B``), ``lora-velora_fx`` (the defaults).
    """
    import velora_fx

    if name.startswith("velora-g"):
        groups, _, budget = name[len("velora-g"):].partition("-b")
        return velora_fx.VeloraConfig(estimator=velora_fx.Velora(num_groups=int(groups)), memory_budget=float(budget) if budget else None)
    if name.startswith("velora-q"):  # the quantized estimator: velora-q{bits}[-b{budget}], groups of 32
        bits, _, budget = name[len("velora-q"):].partition("-b")
        return velora_fx.VeloraConfig(estimator=velora_fx.Quantized(bits=int(bits)),
                                      memory_budget=float(budget) if budget else None)  # fmt: skip
    if name == "velora-paper":
        return velora_fx.VeloraConfig(num_groups=32, **PAPER_POLICY[kind])
    if name in ESTIMATOR_METHODS:
        estimator = ESTIMATOR_METHODS[name]
        return velora_fx.VeloraConfig(estimator=estimator, rank=32, refresh_every=0 if estimator == "principal" else 100)
    if name == "lora-velora_fx":
        return velora_fx.VeloraConfig()
    if name.startswith("exact-b"):  # nothing compressed: the memory budget alone, scoped as velora_fx scopes it
        return velora_fx.VeloraConfig(exclude=("*",), memory_budget=float(name[len("exact-b"):]))
    return None


def methods_for(model: str) -> list[str]:
    return FULL_METHODS + QUANT_METHODS + (LORA_METHODS if model == "llama" else [])


def reference_for(method: str) -> str:
    return "lora-compile" if method.startswith("lora") else "compile"


# ----------------------------------------------------------------------------- worker side (imports torch)


def _torch_setup():
    import torch

    from benchmarks.measure import import_compiler

    torch.set_num_threads(1)
    import_compiler()
    return torch


def distinct_class(model, method: str):
    """Give this configuration's model its own class, so that Dynamo compiles it afresh.

    Dynamo caches compiled code on the ``forward`` code object and guards on the module's type, not on the
    backend's config: without this, a second model of the same class in the same process silently reuses
    the first one's graph (measured: ``budget-0.2`` ran ``budget-0.5``'s graph, a ``budget`` run after the
    default compile ran the default graph). More cache entries per code object need a higher limit.
    """
    import torch

    cls = type(model)
    model.__class__ = type(f"{cls.__name__}_{method.replace('-', '_').replace('.', '_')}", (cls,), {})
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return model


class Method:
    """One configured model: ``step()`` runs a training step (grads cleared first) and returns the loss."""

    def __init__(self, name: str, kind: str, spec: dict):
        torch = _torch_setup()
        import velora_fx

        self.name = name
        self.kind = kind
        model = make_model(kind, spec["hidden"], spec["layers"], spec["seq"], spec["vocab"])
        if name.startswith("lora"):
            import peft

            vcfg = None
            if "peft-velora" in name:
                vcfg = peft.VeloraConfig(num_groups=32, init_type="batch_average_once", scale=1.0)
            lcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, velora_config=vcfg)
            model = peft.get_peft_model(model, lcfg)
        if name.startswith("ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model = distinct_class(model, name)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.patch = None
        cfg = velora_config_for(name, kind)
        if name in ("eager", "ckpt-eager", "lora-eager", "lora-peft-velora"):
            self.fn = model
        elif cfg is not None:
            self.fn = torch.compile(velora_fx.prepare(model), backend=velora_fx.make_backend(cfg))
        elif name.startswith("budget-"):
            self.patch = float(name[len("budget-"):])
            self.fn = torch.compile(model)
        else:  # compile, ckpt-compile, lora-compile, lora-peft-velora-compile
            self.fn = torch.compile(model)
        self.batch = make_batch(kind, spec["batch"], spec["seq"], spec["vocab"])
        self.first_loss = None

    def forward(self):
        return self.fn(**self.batch).loss

    def step(self):
        for p in self.params:
            p.grad = None
        loss = self.forward()
        loss.backward()
        return loss

    def first_step(self) -> float:
        """The first (compiling, calibrating) step; the activation-memory knob is patched around it."""
        torch = _torch_setup()
        start = time.perf_counter()
        if self.patch is not None:
            with torch._functorch.config.patch(activation_memory_budget=self.patch):
                loss = self.step()
        else:
            loss = self.step()
        self.first_loss = float(loss.detach())
        return time.perf_counter() - start

    def saved(self) -> int:
        from benchmarks.measure import saved_bytes

        for p in self.params:
            p.grad = None
        nbytes, loss = saved_bytes(self.forward)
        loss.backward()
        return nbytes

    def report(self) -> dict:
        import velora_fx

        rep = velora_fx.report(self.model)
        return {"compressed": len(rep.compressed), "skipped": len(rep.skipped), "dw_bytes_saved": rep.bytes_saved}


def _progress(msg: str) -> None:
    print(f"@@progress {msg}", file=sys.stderr, flush=True)


def worker_shape(spec: dict) -> dict:
    """All methods of one (model, shape) in this process: bytes, first loss, interleaved step-time medians."""
    from benchmarks.measure import interleaved_medians

    out: dict[str, dict] = {}
    live: dict[str, Method] = {}
    for name in spec["methods"]:
        row: dict = {}
        try:
            m = Method(name, spec["model"], spec)
            row["first_step_s"] = m.first_step()
            row["loss1"] = m.first_loss
            row["bytes"] = m.saved()
            row["velora"] = m.report()
            live[name] = m
        except Exception as e:  # noqa: BLE001 - a failing method is a result
            import traceback

            row["error"] = f"{type(e).__name__}: " + " | ".join(l.strip() for l in str(e).splitlines() if l.strip())[:600]
            row["traceback"] = traceback.format_exc()[-3000:]
        out[name] = row
        _progress(f"{spec['model']} {name}")
    times = interleaved_medians({k: m.step for k, m in live.items()}, repeats=spec["repeats"], warmup=1)
    for k, t in times.items():
        out[k]["step_s"] = t
    return out


def _rss_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def worker_fresh(spec: dict) -> dict:
    """One method in a fresh process: compile time, peak RSS, the RSS rise of one steady step."""
    import resource

    from benchmarks.measure import interleaved_medians

    name = spec["methods"][0]
    m = Method(name, spec["model"], spec)
    first = m.first_step()
    steady = interleaved_medians({name: m.step}, repeats=4, warmup=1)[name]
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
        m.step()
        step_rise = (_rss_kb("VmHWM") - before) / 1024
    except OSError:
        step_rise = None
    return {
        "compile_s": first - steady,
        "fresh_first_step_s": first,
        "fresh_step_s": steady,
        "fresh_loss1": m.first_loss,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_rss_mb": step_rise,
    }


# ----------------------------------------------------------------------------- orchestrator (no torch import)


def _run_worker(mode: str, spec: dict, env: dict, pbar, timeout: float) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), mode, json.dumps(spec)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    tail: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("@@progress"):
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix_str(line.split(" ", 1)[1].strip()[:40])
        else:
            tail = (tail + [line.rstrip()])[-20:]
        if time.monotonic() > deadline:
            proc.kill()
            break
    stdout = proc.stdout.read() if proc.stdout else ""
    rc = proc.wait()
    for line in reversed(stdout.splitlines()):
        if line.startswith("@@result "):
            return json.loads(line[len("@@result "):])
    return {"error": f"worker rc={rc}: " + " | ".join(tail[-3:])}


def _env(cache_dir: str, cold_graph_caches: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if cold_graph_caches:
        env.update(TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    return env


def _shape_label(s: dict) -> str:
    return f"h{s['hidden']}xL{s['layers']} seq{s['seq']}"


def compute_ratios(rows: list[dict]) -> None:
    by = {(r["model"], r["shape"], r["method"]): r for r in rows}
    eager = ("eager", "ckpt-eager", "lora-eager", "lora-peft-velora")
    for r in rows:
        if r["method"] not in eager and r.get("first_step_s") is not None and r.get("step_s") is not None:
            r["compile_s_inproc"] = r["first_step_s"] - r["step_s"]
    for r in rows:
        ref = by.get((r["model"], r["shape"], reference_for(r["method"])), {})
        r["ref"] = reference_for(r["method"])
        for key, out in (("bytes", "bytes_ratio"), ("step_s", "step_ratio"), ("compile_s", "compile_ratio"),
                         ("compile_s_inproc", "compile_inproc_ratio")):  # fmt: skip
            a, b = r.get(key), ref.get(key)
            r[out] = a / b if a is not None and b else None


def budget_front(rows: list[dict]) -> str:
    """Per (model, shape) and budget: velora_fx under the budget against the budget alone (bytes and step time),
    and the fewest bytes velora_fx keeps at <= 1.05x the default compile's step time (the issue's two targets)."""
    by = {(r["model"], r["shape"], r["method"]): r for r in rows}
    lines = ["| model | shape | budget | velora+budget / budget: bytes | step | fewest bytes at <= 1.05x step (method) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for model, shape in dict.fromkeys((r["model"], r["shape"]) for r in rows):
        best = [(r["bytes_ratio"], r["method"]) for m in ("velora-g32", "velora-g32-b0.5", "velora-g32-b0.3", "velora-g32-b0.2")
                if (r := by.get((model, shape, m))) and r.get("bytes_ratio") and r.get("step_ratio") is not None
                and r["step_ratio"] <= 1.05]  # fmt: skip
        fewest = f"{min(best)[0]:.2f}x ({min(best)[1]})" if best else "—"
        for b in ("1.0", "0.5", "0.3", "0.2"):
            v = by.get((model, shape, "velora-g32" if b == "1.0" else f"velora-g32-b{b}"), {})
            e = by.get((model, shape, "compile" if b == "1.0" else f"budget-{b}"), {})
            if v.get("bytes") and e.get("bytes") and v.get("step_s") and e.get("step_s"):
                lines.append(f"| {model} | {shape} | {b} | {v['bytes'] / e['bytes']:.2f} | "
                             f"{v['step_s'] / e['step_s']:.2f} | {fewest if b == '1.0' else ''} |")  # fmt: skip
    return "\n".join(lines)


def _fmt(x, spec="{:.2f}"):
    return "—" if x is None else spec.format(x)


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["model", "shape", "method", "kept MiB", "bytes ×", "step ms", "step ×", "compile s", "compile ×", "compile s (in-proc)", "×",
            "RSS MiB", "step RSS MiB", "loss@1", "sites", "note"]  # fmt: skip
    lines = []
    for r in rows:
        v = r.get("velora") or {}
        sites = f"{v['compressed']}/{v['compressed'] + v['skipped']}" if v.get("compressed") or v.get("skipped") else ""
        lines.append([
            r["model"], r["shape"], r["method"], _fmt(r.get("bytes") and r["bytes"] / 2**20),
            _fmt(r.get("bytes_ratio")), _fmt(r.get("step_s") and r["step_s"] * 1e3, "{:.1f}"),
            _fmt(r.get("step_ratio")), _fmt(r.get("compile_s"), "{:.1f}"), _fmt(r.get("compile_ratio")),
            _fmt(r.get("compile_s_inproc"), "{:.1f}"), _fmt(r.get("compile_inproc_ratio")),
            _fmt(r.get("rss_mb"), "{:.0f}"), _fmt(r.get("step_rss_mb"), "{:.1f}"), _fmt(r.get("loss1"), "{:.4f}"),
            sites, (r.get("error") or "")[:90],
        ])  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(map(str, l)).replace("\n", " ") + " |" for l in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(str(l[i])) for l in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def plots(rows: list[dict], main_shape: str, out_dir: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=["llama", "gpt2", "vit"].index)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    colors = {
        "eager": "0.5", "compile": "k", "ckpt-eager": "tab:brown", "ckpt-compile": "tab:orange",
        "budget-0.5": "tab:olive", "budget-0.3": "tab:olive", "budget-0.2": "tab:green", "velora-paper": "tab:purple",
        "lora-eager": "0.7", "lora-compile": "0.3", "lora-peft-velora": "tab:pink",
        "lora-peft-velora-compile": "tab:red", "lora-velora_fx": "tab:cyan",
    }  # fmt: skip
    written = []
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in rows:
            if r["model"] != model or r.get("bytes_ratio") is None or r.get("step_ratio") is None:
                continue
            main = r["shape"] == main_shape
            c = colors.get(r["method"], "tab:blue")
            ax.scatter(r["step_ratio"], r["bytes_ratio"], color=c, s=46 if main else 12, alpha=1 if main else 0.35,
                       marker="s" if r["method"].startswith("lora") else "o", edgecolors="none")  # fmt: skip
            if main:
                ax.annotate(r["method"].replace("velora-", "v-"), (r["step_ratio"], r["bytes_ratio"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")  # fmt: skip
        main_rows = {r["method"]: r for r in rows if r["model"] == model and r["shape"] == main_shape}
        for family, color in ((["compile", "budget-0.5", "budget-0.3", "budget-0.2"], "tab:green"),
                              (["velora-g32", "velora-g32-b0.5", "velora-g32-b0.3", "velora-g32-b0.2"], "tab:blue")):
            pts = [(main_rows[m]["step_ratio"], main_rows[m]["bytes_ratio"]) for m in family
                   if m in main_rows and main_rows[m].get("bytes_ratio") is not None
                   and main_rows[m].get("step_ratio") is not None]  # fmt: skip
            if len(pts) > 1:  # the memory knob's front: budget 1 -> 0.2
                ax.plot([x for x, _ in pts], [y for _, y in pts], "-", color=color, lw=1, alpha=0.7)
        ax.axhline(1, color="0.8", lw=0.8)
        ax.axvline(1, color="0.8", lw=0.8)
        ax.set_title(f"{model} (large marks: {main_shape})", fontsize=9)
        ax.set_xlabel("step time / compile (LoRA: / lora-compile)", fontsize=8)
        ax.set_ylabel("bytes kept for backward / same reference", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    p = out_dir / "peers_pareto.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    written.append(str(p))

    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.0), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, shape in enumerate(shapes):
            by = {r["method"]: r for r in rows if r["model"] == model and r["shape"] == shape}
            pts = sorted((int(k[len("velora-g"):]), r["bytes"] / 2**20) for k, r in by.items()
                         if k.startswith("velora-g") and k[len("velora-g"):].isdigit() and r.get("bytes"))  # fmt: skip
            if not pts:
                continue
            line = ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"velora {shape}", ms=3)[0]
            for ref, ls in (("compile", "--"), ("budget-0.5", ":"), ("ckpt-compile", "-.")):
                if by.get(ref, {}).get("bytes"):
                    ax.axhline(by[ref]["bytes"] / 2**20, color=line.get_color(), ls=ls, lw=0.8,
                               label=f"{ref}" if i == 0 else None)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("num_groups (scalars kept per token)", fontsize=8)
        ax.set_ylabel("bytes kept for backward (MiB)", fontsize=8)
        ax.set_title(f"{model}: -- compile, : budget 0.5, -. ckpt", fontsize=9)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    p = out_dir / "peers_groups.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    written.append(str(p))
    return written


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one size (256x2), one sequence length (128)")
    ap.add_argument("--models", default="llama,gpt2,vit")
    ap.add_argument("--sizes", default="128x2,256x2", help="hidden x layers, comma separated")
    ap.add_argument("--seqs", default="128,256")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10, help="interleaved timed steps per method")
    ap.add_argument("--main", default=None, help="the shape with fresh-process figures, e.g. 256x2:128 (default: last size, first seq)")
    ap.add_argument("--fresh", choices=("main", "all", "none"), default="main",
                    help="which shapes get a fresh process per method (compile time, peak RSS)")  # fmt: skip
    ap.add_argument("--methods", default=None, help="comma-separated subset of methods")
    ap.add_argument("--fresh-methods", default=None, help="comma-separated: only these methods get a fresh process")
    ap.add_argument("--cache-dir", default=None, help="Inductor cache (default: a new empty temporary directory)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker process (a shape process compiles every method)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--replot", default=None, help="redraw the plots (and the budget front) from this results JSON")
    ap.add_argument("--worker-shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-fresh", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.seqs = "256x2", "128"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for mode, fn in (("worker_shape", worker_shape), ("worker_fresh", worker_fresh)):
        spec = getattr(args, mode)
        if spec:
            print("@@result " + json.dumps(fn(json.loads(spec))), flush=True)
            return

    if args.replot:
        data = json.loads(pathlib.Path(args.replot).read_text())
        print(budget_front(data["rows"]))
        for p in plots(data["rows"], data["meta"]["main_shape"], pathlib.Path(args.replot).parent):
            print("wrote", p)
        return

    from tqdm import tqdm

    measured_at = commit()  # at the start: the code that runs, whatever HEAD is when the run ends
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    models = args.models.split(",")
    main_key = args.main or f"{sizes[-1][0]}x{sizes[-1][1]}:{seqs[0]}"
    mh, ml, ms = (int(v) for v in main_key.replace(":", "x").split("x"))
    main_shape = _shape_label({"hidden": mh, "layers": ml, "seq": ms})
    subset = set(args.methods.split(",")) if args.methods else None
    fresh_subset = set(args.fresh_methods.split(",")) if args.fresh_methods else None

    jobs = []
    for model in models:
        methods = [m for m in methods_for(model) if subset is None or m in subset]
        for hidden, layers in sizes:
            for seq in seqs:
                spec = dict(model=model, hidden=hidden, layers=layers, seq=seq, batch=args.batch, vocab=args.vocab,
                            repeats=args.repeats, methods=methods)  # fmt: skip
                fresh = args.fresh == "all" or (args.fresh == "main" and _shape_label(spec) == main_shape)
                jobs.append((spec, fresh))
    total = sum(len(s["methods"]) + (len(fresh_subset & set(s["methods"])) if fresh_subset else len(s["methods"])) * f
                for s, f in jobs)  # fmt: skip
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "peers_quick" if args.quick else "peers"
    partial = out_dir / f"{name}.partial.json"

    tmp = tempfile.TemporaryDirectory(prefix="velora_peers_")
    cache = args.cache_dir or tmp.name
    started = time.perf_counter()
    rows: list[dict] = []
    with tqdm(total=total, desc="configurations", unit="cfg", dynamic_ncols=True) as pbar:
        for spec, fresh in jobs:
            res = _run_worker("--worker-shape", spec, _env(cache, True), pbar, args.timeout)
            shape = _shape_label(spec)
            if "error" in res and not isinstance(res.get("error"), dict) and len(res) == 1:
                res = {m: {"error": res["error"]} for m in spec["methods"]}
                pbar.update(len(spec["methods"]))
            for method in spec["methods"]:
                row = {"model": spec["model"], "shape": shape, "hidden": spec["hidden"], "layers": spec["layers"],
                       "seq": spec["seq"], "batch": spec["batch"], "method": method, **res.get(method, {})}  # fmt: skip
                if fresh and "error" not in row and (fresh_subset is None or method in fresh_subset):
                    one = dict(spec, methods=[method])
                    fr = _run_worker("--worker-fresh", one, _env(cache, True), None, args.timeout)
                    if "error" in fr:
                        row["fresh_error"] = fr["error"]
                    row.update({k: v for k, v in fr.items() if k != "error"})
                    if method in ("eager", "ckpt-eager", "lora-eager", "lora-peft-velora"):
                        row["compile_s"] = None  # nothing compiled: first-step overhead is not a compile time
                    pbar.update(1)
                rows.append(row)
                partial.write_text(json.dumps({"meta": {"commit": measured_at, "main_shape": main_shape}, "rows": rows},
                                              indent=1))  # fmt: skip
    elapsed = time.perf_counter() - started
    compute_ratios(rows)

    import platform

    import torch

    meta = {
        "commit": measured_at,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "threads_per_process": 1,
        "load_average_at_end": os.getloadavg(),
        "main_shape": main_shape,
        "batch": args.batch,
        "vocab": args.vocab,
        "repeats": args.repeats,
        "wall_seconds": elapsed,
        "paper_policy": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in PAPER_POLICY.items()},
    }
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    print("\n" + budget_front(rows))
    print(f"\nmain shape {main_shape}; wall time {elapsed / 60:.1f} min; torch {torch.__version__}")
    for p in plots(rows, main_shape, out_dir):  # the latest run's plots, quick or full
        print("wrote", p)
    partial.unlink(missing_ok=True)
    print("wrote", out_dir / f"{name}.json")


if __name__ == "__main__":
    main()
