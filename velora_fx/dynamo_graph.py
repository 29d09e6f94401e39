"""What the backend reads from a Dynamo graph: its trainable parameters, and the matmuls each one feeds.

Dynamo lifts every parameter a compiled frame touches as a graph input; this
module finds, for each trainable one, the matmuls it reaches as the weight
operand (through the weight chain of ``passes/sites.py``), the input operand
of each, and the contraction size ``D`` they share. Nothing here changes the
graph; nothing here keeps a reference to the parameters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch
import torch.fx
from torch import nn

from velora_fx import _torch_internals as ti
from velora_fx.passes.sites import is_torch_weight_chain, torch_site

__all__ = ["ParamUse", "trainable_parameters", "param_uses", "source_name"]


@dataclasses.dataclass
class ParamUse:
    """What the Dynamo graph says about one trainable parameter input."""

    index: int  # position among the graph's inputs
    node: torch.fx.Node
    uses: list[tuple[torch.fx.Node, torch.fx.Node]]  # (matmul node, its input operand), in graph order
    features: Optional[int] = None  # the contraction size D, when every use agrees on a static one
    reason: str = ""  # why the parameter cannot be compressed ("" if it can)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The names of the input operands: weights with the same ones read the same tensors."""
        return tuple(sorted({inp.name for _, inp in self.uses}))


def trainable_parameters(gm: torch.fx.GraphModule) -> list[tuple[int, torch.fx.Node, nn.Parameter]]:
    """``(position, placeholder, parameter)`` of every graph input that is a parameter requiring grad."""
    out = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        real = ti.placeholder_example(node)
        if isinstance(real, nn.Parameter) and real.requires_grad:
            out.append((i, node, real))
    return out


def param_uses(gm: torch.fx.GraphModule, index: int, node: torch.fx.Node) -> ParamUse:
    """The matmuls a parameter reaches through the weight chain, and the contraction size they share."""
    out = ParamUse(index, node, [])
    hops: set[str] = set()  # higher-order ops the weight is passed into
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            hop = ti.higher_order_op_name(user.target) if user.op == "call_function" else None
            if hop is not None:
                hops.add(hop)
            site = torch_site(user)
            if site is not None:
                if site.weight is n and isinstance(site.x, torch.fx.Node):
                    out.uses.append((user, site.x))
            elif is_torch_weight_chain(user) and user.args and user.args[0] is n:
                stack.append(user)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out.uses.sort(key=lambda u: order[u[0]])
    found = []  # a list: a SymInt is unhashable
    for _, inp in out.uses:
        val = inp.meta.get("example_value")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            out.reason = f"the input of {inp.name} has no known shape"
            return out
        found.append(val.shape[-1])
    if hops:  # e.g. torch.utils.checkpoint: the matmul lives in a subgraph this backend does not look into
        out.reason = (
            f"the weight is used inside {', '.join(sorted(hops))} (activation checkpointing), whose subgraph "
            "velora_fx does not rewrite; it stays exact (move the checkpoint off this layer to compress it)"
        )
    elif not out.uses:
        out.reason = "the weight reaches no matmul as its right operand (x @ W, F.linear)"
    elif any(ti.is_symbolic(s) for s in found):
        out.reason = "the contraction size is symbolic"
    elif len(sizes := {int(s) for s in found}) > 1:
        out.reason = f"the weight is used with several contraction sizes {sorted(sizes)}"
    else:
        out.features = int(next(iter(sizes)))
    return out


_SOURCE_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]|\.([A-Za-z_][A-Za-z0-9_]*)")


def source_name(node: torch.fx.Node) -> str:
    """A dotted name for a parameter input, from its Dynamo source, relative to the compiled frame
    (``L['self']._modules['lin']._parameters['weight']`` -> ``lin.weight``). Used for models that were not
    prepared; a prepared model names its weights itself."""
    source: Any = ti.placeholder_source(node)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    if not isinstance(name, str):
        return node.name
    parts = [a or b for a, b in _SOURCE_KEY.findall(name)]
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers", "self", ti.COMPILED_SEGMENT)]
    return ".".join(parts) or name
