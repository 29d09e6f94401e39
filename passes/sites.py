"""The site vocabulary of velora_fx: which ops are matmul sites, and which ops lie between a site and its weight.

Defined once per IR level, shared by every pass and analysis at that level:

* **torch level**: graphs whose nodes are ``torch`` functions, ``Tensor``
  methods and ``nn.Module`` calls: ``torch.fx.symbolic_trace`` output (the FX
  route, ``passes/fx_linear.py``) and Dynamo's graphs (the backend's analysis,
  ``velora_fx/dynamo_graph.py``).
* **aten level**: AOTAutograd's joint forward+backward graph after
  decomposition (``passes/joint_graph.py``).

A *site* is a matmul ``y = x @ op(W) (+ b)`` whose right operand ``W`` is a
trainable parameter, reached through the *weight chain* (views, transposes,
casts). Every node velora_fx inserts or decides on carries
``node.meta[META_KEY]``, a dict; the keys each pass writes are listed in
``passes/README.md``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

from velora_fx import _torch_internals as ti

__all__ = ["META_KEY", "TorchSite", "torch_site", "is_torch_weight_chain", "is_transpose_2d", "ATEN_MATMULS",
           "ATEN_WEIGHT_CHAIN", "ATEN_INPUT_CHAIN", "ATEN_VIEWS", "ATEN_ROW_VIEWS", "ATEN_TRANSPOSES_2D"]  # fmt: skip

#: The one ``node.meta`` key of velora_fx, in every graph it touches.
META_KEY = "velora_fx"

# -- torch level -------------------------------------------------------------------------------------

#: ``F.linear(x, W, b)``: ``W`` is ``(out, D)`` (Dynamo records the C function behind ``F.linear``).
LINEAR_FNS = frozenset({F.linear, ti.c_linear()})
#: ``x @ W``: ``W`` is ``(D, out)`` (or a transposed ``(out, D)``).
MATMUL_FNS = frozenset({torch.matmul, operator.matmul, torch.mm, torch.bmm})
MATMUL_METHODS = frozenset({"matmul", "mm", "bmm", "__matmul__"})
#: ``addmm(b, x, W)`` (GPT-2's ``Conv1D``): ``W`` is ``(D, out)``.
ADDMM_FNS = frozenset({torch.addmm, torch.baddbmm})
ADDMM_METHODS = frozenset({"addmm", "baddbmm"})

#: Ops a weight may flow through between the parameter and the matmul.
WEIGHT_CHAIN_FNS = frozenset({torch.t, torch.transpose, torch.permute, torch.reshape, torch.squeeze,
                              torch.unsqueeze, getattr})  # fmt: skip
WEIGHT_CHAIN_METHODS = frozenset({
    "t", "transpose", "permute", "view", "reshape", "expand", "contiguous", "to", "float", "half", "bfloat16",
    "type_as", "squeeze", "unsqueeze", "expand_as", "view_as", "reshape_as",
})  # fmt: skip


@dataclass(frozen=True)
class TorchSite:
    """A torch-level matmul: its input operand, its weight operand, its bias (if any), and the weight layout.

    ``weight_is_out_by_in`` is ``True`` for ``F.linear`` (``W`` is ``(out, D)``)
    and ``False`` for ``x @ W`` / ``addmm`` (``W`` is ``(D, out)``), *before*
    any transpose in the weight chain.
    """

    node: torch.fx.Node
    x: Any
    weight: Any
    bias: Any
    weight_is_out_by_in: bool


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def torch_site(node: torch.fx.Node) -> Optional[TorchSite]:
    """The operands of a torch-level matmul node, ``None`` for any other node (``call_module`` included)."""
    if node.op == "call_function":
        if node.target in LINEAR_FNS:
            return TorchSite(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), True)
        if node.target in MATMUL_FNS and len(node.args) > 1:
            return TorchSite(node, node.args[0], node.args[1], None, False)
        if node.target in ADDMM_FNS and len(node.args) > 2:
            return TorchSite(node, node.args[1], node.args[2], node.args[0], False)
    elif node.op == "call_method":
        if node.target in MATMUL_METHODS and len(node.args) > 1:
            return TorchSite(node, node.args[0], node.args[1], None, False)
        if node.target in ADDMM_METHODS and len(node.args) > 2:
            return TorchSite(node, node.args[1], node.args[2], node.args[0], False)
    return None


def is_torch_weight_chain(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a view, transpose or cast of its first argument (a link of the weight chain)."""
    return (node.op == "call_function" and node.target in WEIGHT_CHAIN_FNS) or (
        node.op == "call_method" and node.target in WEIGHT_CHAIN_METHODS
    )


def is_transpose_2d(node: torch.fx.Node) -> bool:
    """``W.t()``, ``W.T``, ``W.mT``, ``W.transpose(0, 1)`` and friends on a 2-D tensor."""
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_function" and node.target is torch.t:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return True
    is_transpose = (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target is torch.transpose
    )
    return is_transpose and len(node.args) == 3 and {d % 2 for d in node.args[1:3] if isinstance(d, int)} == {0, 1}


# -- aten level --------------------------------------------------------------------------------------

aten = torch.ops.aten
prims = torch.ops.prims

#: Forward matmuls and the positions of their (input, weight) operands.
ATEN_MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
                aten.linear.default: (0, 1)}  # fmt: skip

#: Ops a weight flows through between the parameter input and the matmul.
ATEN_WEIGHT_CHAIN = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.expand.default, aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten._to_copy.default, prims.convert_element_type.default,
})  # fmt: skip

#: Ops from a stored input to the matmul that keep its last dimension's rows intact.
ATEN_INPUT_CHAIN = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default})

#: Pure views: re-applied to ``x̂`` with the same arguments where a backward use reads a view of ``X``.
ATEN_VIEWS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default, aten.permute.default,
    aten.t.default, aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims,
})  # fmt: skip

#: Row-major views that keep the last dimension (and so the order of the rows).
ATEN_ROW_VIEWS = ATEN_INPUT_CHAIN
#: How a 2-D tensor is transposed.
ATEN_TRANSPOSES_2D = frozenset({aten.t.default, aten.transpose.int, aten.permute.default})
