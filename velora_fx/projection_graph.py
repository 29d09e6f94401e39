"""The projection codecs in a joint graph: ``p = X B`` before the first site, ``dŴ`` from ``p``, ``x̂`` where needed.

Every quantity here is one ``aten.mm`` with the basis ``B`` (d, r) or its
transpose: an extern kernel, nothing for Inductor to generate (when ``d``
divides ``D``: else the last sub-token is padded / cut, one small kernel).
With ``X`` of shape ``(N, D)`` seen as ``N·n`` sub-tokens of ``d``::

    p  = (X.view(N·n, d) @ B).view(N, n·r)
    x̂  = (p.view(N·n, r) @ Bᵀ).view(N, n·d)[:, :D]
    dŴ = ((G p).view(out·n, r) @ Bᵀ).view(out, n·d)[:, :D]        G p first: N × n·r, not N × D

Measured on the LLaMA-style stack of benchmarks/backend_bench.py: with the
projection and the dW assembly as pointwise code, compile time 1.30-1.34x the
default backend's (~5 more generated kernels per graph); as matmuls, 1.00x.
The one thing pointwise code bought: min-cut may recompute a pointwise
projection in backward from what it keeps anyway (the norm's input), while it
never recomputes an mm, so p is saved: 0.725x vs 0.740x bytes kept there.

The numbers are those of ``ops.project`` / ``ops.weight_grad`` (NOTE [VeLoRA
weight gradient]) up to float re-association.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx

from velora_fx.passes.graph_writer import GraphWriter, val

__all__ = ["encode", "decode", "weight_grad"]

aten = torch.ops.aten


def _as_basis(w: GraphWriter, basis: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """The basis input as a ``(d, r)`` matrix in ``dtype`` (VeLoRA's ``(d,)`` direction is a column)."""
    basis = w.cast(basis, dtype)
    return w(aten.view.default, basis, [-1, 1]) if val(basis).dim() == 1 else basis


def _sub_token_rows(w: GraphWriter, x: torch.fx.Node, d: int) -> torch.fx.Node:
    """``x`` of shape ``(..., D)`` as ``(N·n, d)`` sub-token rows (padded to ``n·d``; copied when its strides
    do not allow the view)."""
    features = int(val(x).shape[-1])
    n = -(-features // d)
    if n * d != features:
        x = w(aten.constant_pad_nd.default, x, [0, n * d - features], 0.0)
    try:
        val(x).view(-1, d)
    except (RuntimeError, ValueError):  # e.g. a strided slice (a [CLS] token): copy it (transient, forward only)
        x = w(aten.clone.default, x, memory_format=torch.contiguous_format)
    return w(aten.view.default, x, [-1, d])


def _spread(w: GraphWriter, q: torch.fx.Node, basis: torch.fx.Node, features: int) -> torch.fx.Node:
    """``q`` of shape ``(R, n·r)`` back in input coordinates: ``(R, D)``, block ``j`` is ``q[:, j·r:(j+1)·r] @ Bᵀ``."""
    d, r = (int(s) for s in val(basis).shape)
    n = int(val(q).shape[-1]) // r
    rows = w(aten.view.default, q, [-1, r])
    flat = w(aten.view.default, w(aten.mm.default, rows, w(aten.permute.default, basis, [1, 0])), [-1, n * d])
    return flat if n * d == features else w(aten.slice.Tensor, flat, 1, 0, features)


def encode(w: GraphWriter, x: torch.fx.Node, basis: torch.fx.Node) -> tuple[torch.fx.Node]:
    """``(p,)``, ``p`` of shape ``(N, n·r)`` (rows of ``X``)."""
    bb = _as_basis(GraphWriter(w.graph, w.like, "basis"), basis, val(x).dtype)
    d, r = (int(s) for s in val(bb).shape)
    n = -(-int(val(x).shape[-1]) // d)
    return (w(aten.view.default, w(aten.mm.default, _sub_token_rows(w, x, d), bb), [-1, n * r]),)


def decode(w: GraphWriter, x: torch.fx.Node, p: torch.fx.Node, basis: torch.fx.Node, scale: float) -> torch.fx.Node:
    """``x̂ = scale · p Bᵀ`` blockwise, in the shape of ``x``."""
    features = int(val(x).shape[-1])
    x_hat = _spread(w, w.scaled(p, scale), _as_basis(w, basis, val(p).dtype), features)
    return w(aten.view.default, x_hat, [*w.dims(x, val(x).dim() - 1), features])


def weight_grad(w: GraphWriter, g: torch.fx.Node, rows: Optional[Any], p: torch.fx.Node, basis: torch.fx.Node,
                features: int, scale: float) -> torch.fx.Node:  # fmt: skip
    """``dŴ = scale · (g p) Bᵀ`` blockwise, ``(out, D)``, from ``g`` ``(out, N)``; ``rows``: ``N`` as the weight
    gradient spells it, when ``p``'s first dimension spells it differently (else ``None``)."""
    bb = _as_basis(w, basis, val(p).dtype)
    p2d = p if rows is None else w(aten.view.default, p, [rows, val(p).shape[1]])
    return _spread(w, w.scaled(w(aten.mm.default, g, p2d), scale), bb, features)
