"""What the tests share: one training step with the bytes it saves, gradients, captured ``X`` / ``g``, the VeLoRA
formula, and a reference model patched with ``velora_fx.ops.velora_linear``."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

import velora_fx
from velora_fx import ops

RTOL, ATOL = 1e-4, 1e-6


class Run(types.SimpleNamespace):
    """What a fixture ran (short repr: hypothesis prints it on failure)."""

    def __repr__(self) -> str:
        return f"Run({', '.join(self.__dict__)})"


def saved_bytes_step(fn, *inputs, loss_fn=lambda out: out.float().pow(2).mean()):
    """Loss of one training step and the bytes of distinct storages saved for backward during its forward."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(fn(*inputs))
    loss.backward()
    return loss.detach(), sum(storages.values())


def kept_bytes(fn, *inputs) -> int:
    """Bytes of the distinct non-parameter storages the compiled graph keeps for backward (``sum()`` keeps nothing
    itself): what ``velora_fx.report(model).saved_bytes`` counts."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*inputs).sum()
    loss.backward()
    return sum(storages.values())


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient, by name (``torch.compile``'s ``_orig_mod`` segments left out, as velora_fx does)."""
    model = getattr(model, "_orig_mod", model)
    return {n.replace("._orig_mod", ""): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def directions(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each compressed weight's basis (VeLoRA's ``v``), by weight name, as ``velora_fx.projections`` reports it."""
    return {name: p.basis.detach().clone() for name, p in velora_fx.projections(model).items()}


def state_keys(model: nn.Module) -> set[str]:
    """The keys velora_fx added to ``model.state_dict()``."""
    return {k for k in getattr(model, "_orig_mod", model).state_dict() if k.startswith("velora_fx.")}


def capture_linears(model: nn.Module):
    """Hooks on every nn.Linear of ``model``: its input ``x`` and its output gradient ``g``."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            rec = seen.setdefault(name, {})
            handles.append(mod.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0].detach())))
            handles.append(mod.register_full_backward_hook(lambda m, gi, go, rec=rec: rec.__setitem__("g", go[0].detach())))
    return seen, handles


def velora_dw(x, g, v, scale):
    """``scale · gᵀ x̂`` with ``x̂ = reconstruct(project(x, v))``, from velora_fx.ops."""
    features = x.shape[-1]
    x_hat = ops.reconstruct(ops.project(x, v), v, features).reshape(-1, features)
    return scale * g.reshape(-1, g.shape[-1]).t() @ x_hat


def patched_with_velora_linear(model: nn.Module, vs: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """A copy of ``model`` where every ``nn.Linear`` whose weight has a basis in ``vs`` runs ``ops.velora_linear``."""
    model = copy.deepcopy(model)
    for name, mod in model.named_modules():
        key = f"{name}.weight"
        if isinstance(mod, nn.Linear) and key in vs:
            v = vs[key]

            def forward(self, x, v=v):
                return ops.velora_linear(x, self.weight, self.bias, v, scale)

            mod.forward = types.MethodType(forward, mod)
    return model


def assert_close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())), msg=lambda m: f"{what}: {m}")


# -- test-only views of torch internals (the library's own go through velora_fx/_torch_internals.py) ------------


def generated_code(fn) -> list[str]:
    """The source of every graph Inductor compiles while running ``fn()`` (its test utility ``run_and_get_code``)."""
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(fn)
    return list(code)


def aot_cache_hits() -> int:
    """How many AOTAutograd cache hits this process has had."""
    from torch._dynamo.utils import counters

    return int(counters["aot_autograd"]["autograd_cache_hit"])
