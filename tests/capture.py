"""Reference quantities for the tests: what each matmul of an untouched model saw, and the VeLoRA dW from it."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx

from velora_fx import ops
from velora_fx.passes import fx_linear


@dataclass
class Seen:
    weight_name: str
    weight_is_out_by_in: bool
    x: torch.Tensor
    y: torch.Tensor  # output, with retain_grad(): y.grad is g after backward


class SiteCapture(fx.Interpreter):
    """Runs an *untransformed* traced model and keeps each candidate site's input and output."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[str, Seen] = {}

    def run_node(self, n):
        out = super().run_node(n)
        site = fx_linear.candidate(self.module, n)
        if site is not None and site.unsupported is None and out.requires_grad:
            out.retain_grad()
            x = self.env[site.x] if isinstance(site.x, fx.Node) else site.x
            self.seen[n.name] = Seen(site.weight_name, site.weight_is_out_by_in, x.detach(), out)
        return out


def reference_step(model, *inputs, loss_fn=lambda out: out.float().pow(2).mean()):
    """Forward + backward of an untouched deep copy; returns (model copy, output, captures)."""
    ref = copy.deepcopy(model)
    gm = fx.symbolic_trace(ref)
    inputs = [i.detach().requires_grad_(i.is_floating_point()) for i in inputs]
    cap = SiteCapture(gm)
    out = cap.run(*inputs)
    loss_fn(out).backward()
    return ref, out, inputs, cap.seen


def velora_dw(seen: Seen, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · gᵀ x̂`` for one site, computed in float64 from the captured x and g."""
    x_hat = ops.reconstruct(ops.project(seen.x.double(), v.double()), v.double(), seen.x.shape[-1])
    x2 = x_hat.reshape(-1, seen.x.shape[-1])
    g = seen.y.grad.double().reshape(-1, seen.y.shape[-1])
    dw = g.t() @ x2 if seen.weight_is_out_by_in else x2.t() @ g
    return scale * dw
