"""What runs at training time: projecting, reconstructing, choosing the basis, and the VeLoRA linear op.

NOTE [VeLoRA weight gradient]
For ``y = x Wᵀ + b`` with ``x`` of shape ``(..., D)``, autograd keeps ``x``
only to form ``dW = gᵀ x`` (``g = dy``, leading dims flattened). velora_fx
splits every token into ``n = ceil(D / d)`` sub-tokens of size ``d`` (the
last one zero-padded when ``d`` does not divide ``D``) and keeps, per
sub-token, its ``r`` coordinates in a basis ``B`` of shape ``(d, r)``::

    p  = z @ B                    z = pad(x).view(..., n, d)      (kept: n·r per token)
    x̂  = (p @ Bᵀ).view(..., n * d)[..., :D]                      (never built)
    dW ≈ scale · gᵀ x̂             dx = g W, db = Σ g              (exact)

VeLoRA is ``r = 1``, ``B = v`` a unit vector, ``d = D / num_groups``. The
token-level estimators of ``VeloraConfig.estimator`` are ``d = D`` (one
sub-token), ``r`` = the rank. Backward never builds ``x̂``:
``dŴ.view(out, n, d) = (gᵀ p).view(out, n, r) @ Bᵀ`` — an ``(out × N × n·r)``
matmul instead of ``(out × N × D)``, and no ``N × D`` temporary.

``x̂ = x P`` with ``P = blockdiag(B Bᵀ, ...)``, so ``dŴ = dW P``. For VeLoRA
and the principal basis, ``P`` is an orthogonal projection: ``dŴ`` is ``dW``
projected on a subspace (a bias). For a random ``B`` with ``E[B Bᵀ] = I``,
``E[dŴ] = dW``: unbiased.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "project",
    "reconstruct",
    "weight_grad",
    "sub_token_mean",
    "initial_direction",
    "direction_from_mean",
    "refreshed_direction",
    "random_direction",
    "velora_linear",
    "VeloraLinearFunction",
]

log = logging.getLogger(__name__)


def _num_sub_tokens(features: int, d: int) -> int:
    return -(-features // d)


def _as_basis(basis: torch.Tensor) -> torch.Tensor:
    """A ``(d,)`` direction as the ``(d, 1)`` basis it is."""
    return basis.unsqueeze(-1) if basis.dim() == 1 else basis


def _sub_tokens(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` of shape ``(..., D)`` as ``(..., n, d)``, zero-padding the last sub-token."""
    features = x.shape[-1]
    n = _num_sub_tokens(features, d)
    if n * d != features:
        x = F.pad(x, (0, n * d - features))
    return x.reshape(*x.shape[:-1], n, d)


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates ``p`` of the sub-tokens of ``x`` in ``basis``: shape ``(..., n·r)``, dtype of ``x``.

    ``basis`` is a ``(d,)`` direction (VeLoRA: ``p`` is ``(..., n)``) or a ``(d, r)`` basis.

    Example::

        >>> v = torch.tensor([1.0, 0.0])
        >>> project(torch.tensor([[1.0, 2.0, 3.0]]), v)   # sub-tokens [1, 2], [3, 0]
        tensor([[1., 3.]])
    """
    b = _as_basis(basis)
    return torch.matmul(_sub_tokens(x, b.shape[0]), b.to(x.dtype)).flatten(-2)


def reconstruct(p: torch.Tensor, basis: torch.Tensor, features: int) -> torch.Tensor:
    """The coarse input ``x̂`` of shape ``(..., features)`` rebuilt from ``p = project(x, basis)``.

    Example::

        >>> v = torch.tensor([1.0, 0.0])
        >>> reconstruct(torch.tensor([[1.0, 3.0]]), v, 3)
        tensor([[1., 0., 3.]])
    """
    b = _as_basis(basis).to(p.dtype)
    r = b.shape[1]
    x_hat = (p.unflatten(-1, (-1, r)) @ b.t()).flatten(-2)
    return x_hat if x_hat.shape[-1] == features else x_hat[..., :features]


def weight_grad(g: torch.Tensor, p: torch.Tensor, basis: torch.Tensor, features: int) -> torch.Tensor:
    """``gᵀ x̂`` of shape ``(out, features)`` from ``g`` ``(N, out)`` and ``p`` ``(N, n·r)``, without building ``x̂``."""
    b = _as_basis(basis).to(g.dtype)
    d, r = b.shape
    out = g.shape[-1]
    gp = g.t().mm(p.to(g.dtype))  # (out, n·r)
    dw = (gp.view(out, -1, r) @ b.t()).reshape(out, -1)  # (out, n·d)
    return dw if dw.shape[1] == features else dw[:, :features]


def sub_token_mean(x: torch.Tensor, d: int) -> torch.Tensor:
    """Mean of all sub-tokens of ``x`` (padded ones included), in float32, shape ``(d,)``."""
    z = _sub_tokens(x.detach(), d).reshape(-1, d)
    return z.sum(0, dtype=torch.float32) / max(z.shape[0], 1)


def _unit(vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``vec / ‖vec‖`` and whether that is a usable direction (finite, non-zero)."""
    norm = torch.linalg.vector_norm(vec)
    ok = torch.isfinite(norm) & (norm > torch.finfo(torch.float32).tiny)
    return vec / torch.where(ok, norm, torch.ones_like(norm)), ok


def initial_direction(x: torch.Tensor, d: int, layer: str) -> torch.Tensor:
    """The first ``v`` of ``layer``: the normalised mean sub-token of ``x`` (float32).

    Raises ``ValueError`` naming ``layer`` when ``x`` holds NaN/inf: a
    direction computed from it would poison every later weight gradient. A
    batch whose sub-tokens average to zero (all-zero input, or exactly
    cancelling) has no mean direction: ``v`` falls back to the uniform
    direction ``1/√d`` and a warning names the layer.
    """
    return direction_from_mean(sub_token_mean(x, d), layer)


def direction_from_mean(mean: torch.Tensor, layer: str) -> torch.Tensor:
    """``initial_direction`` from an already averaged sub-token ``mean`` (e.g. all-reduced over ranks); same checks."""
    d = mean.shape[0]
    if not bool(torch.isfinite(mean).all()):
        raise ValueError(
            f"velora_fx: the calibration batch of {layer} holds NaN or inf, so no projection "
            "direction can be computed from it; calibrate on a finite batch "
            "(velora_fx.calibrate(model, batch)) or exclude this layer (VeloraConfig(exclude=...))"
        )
    v, ok = _unit(mean)
    if not bool(ok):
        log.warning(
            "velora_fx: the sub-tokens of the calibration batch of %s average to zero; "
            "using the uniform direction 1/sqrt(%d) for it",
            layer,
            d,
        )
        return torch.full((d,), 1.0 / math.sqrt(d), dtype=torch.float32, device=mean.device)
    return v


def refreshed_direction(v: torch.Tensor, x: torch.Tensor, ema_decay: Optional[float]) -> torch.Tensor:
    """``v`` for this training step under ``init="batch_average"`` (``ema_decay=None``) or ``"ema"``.

    Traceable (no data-dependent Python): a batch with no usable mean
    direction (zero or non-finite) keeps the previous ``v``.
    """
    new, ok = _unit(sub_token_mean(x, v.shape[0]))
    if ema_decay is not None:
        new, mixed_ok = _unit(ema_decay * v.float() + (1.0 - ema_decay) * new)
        ok = ok & mixed_ok
    return torch.where(ok, new, v.float()).to(v.dtype)


def seed_for(seed: int, name: str, *salt: int) -> int:
    """A 63-bit seed from the config's ``seed``, a weight's name and optional integers (e.g. a re-seed count)."""
    h = seed * 1_000_003 + zlib.crc32(name.encode())
    for s in salt:
        h = h * 1_000_003 + s
    return h % 2**63


def random_direction(d: int, seed: int, name: str, index: int = 0) -> torch.Tensor:
    """A seeded Gaussian unit vector (float32, CPU), reproducible from ``seed``, the weight's ``name`` and the
    re-seed ``index`` (0: the first)."""
    generator = torch.Generator().manual_seed(seed_for(seed, name, *((index,) if index else ())))
    v = torch.randn(d, generator=generator, dtype=torch.float64)
    return (v / v.norm()).float()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype the matmul runs in: the autocast dtype inside an autocast region, else ``x``'s."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def projected_input(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``p`` as a site keeps it: ``project(x, basis)`` in the dtype the matmul runs in, outside autograd."""
    with torch.no_grad():
        return project(x.detach().to(compute_dtype(x)), basis)


class VeloraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` (``weight_is_out_by_in=False``: ``y = x W + b``) keeping ``p`` instead of ``x`` for ``dW``.

    ``p`` is a projection's coordinates, or, with ``weight_grad`` (a codec's:
    ``weight_grad(g, saved, state, features) -> gᵀ x̂``), the tuple of tensors
    the codec's ``encode`` kept; then ``dW = scale · weight_grad(...)``.

    ``p = projected_input(x, basis)`` is computed by the caller, so that
    several weights reading one ``x`` keep one ``p`` (the same tensor object:
    autograd saves its storage once). See NOTE [VeLoRA weight gradient]. An
    ``autograd.Function`` rather than a ``custom_op`` so that Dynamo traces
    through it and the partitioner can still fuse or recompute the projection.
    """

    @staticmethod
    def forward(ctx, x, p, weight, bias, basis, scale: float, weight_is_out_by_in: bool, weight_grad=None):
        dtype = compute_dtype(x)
        x_c, w_c = x.to(dtype), weight.to(dtype)
        w_lin = w_c if weight_is_out_by_in else w_c.t()
        y = F.linear(x_c, w_lin, None if bias is None else bias.to(dtype))
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        kept = (tuple(p) if isinstance(p, (tuple, list)) else (p,)) if needs_w else (None,)
        ctx.save_for_backward(*kept, w_lin if needs_x else None, basis if needs_w else None)
        ctx.scale = scale
        ctx.weight_is_out_by_in = weight_is_out_by_in
        ctx.weight_grad = weight_grad
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.features = x.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: a derivative of the approximate dW would be silently wrong.
            raise RuntimeError(
                "velora_fx: double backward (create_graph=True) through a VeLoRA-compressed matmul is not "
                "supported: its weight gradient is an approximation with no exact derivative. Exclude the layer "
                "(VeloraConfig(exclude=...)) or run this step on the model before velora_fx.transform."
            )
        *kept, w_lin, basis = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dx = dw = db = None
        out_features = grad_out.shape[-1]
        if needs_x:
            dx = torch.matmul(grad_out, w_lin.to(grad_out.dtype)).to(ctx.x_dtype)
        if needs_w:
            g = grad_out.reshape(-1, out_features)
            if ctx.weight_grad is None:  # a projection (``velora_linear``)
                dw = weight_grad(g, kept[0].reshape(g.shape[0], -1), basis, ctx.features)
            else:  # the codec's (``velora_fx.fx.linear``)
                dw = ctx.weight_grad(g, kept, basis, ctx.features)
            if ctx.scale != 1.0:
                dw = dw * ctx.scale
            dw = (dw if ctx.weight_is_out_by_in else dw.t()).to(ctx.w_dtype).contiguous()
        if needs_b:
            db = grad_out.reshape(-1, out_features).sum(0).to(ctx.b_dtype)
        return dx, None, dw, db, None, None, None, None


def velora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    v: torch.Tensor,
    scale: float = 1.0,
    weight_is_out_by_in: bool = True,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (or ``x @ weight + bias``) with the VeLoRA weight gradient.

    Args:
        x: input of shape ``(..., D)``, any number of leading dims.
        weight: ``(out, D)`` when ``weight_is_out_by_in`` (``nn.Linear``), else ``(D, out)`` (``x @ W``).
        bias: ``(out,)`` or ``None``.
        v: the basis: a unit vector of size ``d`` (VeLoRA), or a ``(d, r)`` basis.
        scale: factor on the approximate ``dW`` only.

    Returns:
        ``y`` exactly as the plain op computes it; its backward gives exact
        ``dx`` / ``db`` and ``dW = scale · gᵀ x̂``. Without grad mode, or when
        ``weight`` needs no gradient, this is the plain op: nothing is projected.

    Example::

        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> lin = torch.nn.Linear(8, 3)
        >>> v = torch.nn.functional.normalize(torch.ones(4), dim=0)
        >>> velora_linear(x, lin.weight, lin.bias, v).sum().backward()
    """
    if torch.is_grad_enabled() and weight.requires_grad:
        p = projected_input(x, v)
        return VeloraLinearFunction.apply(x, p, weight, bias, v, float(scale), weight_is_out_by_in)
    w_lin = weight if weight_is_out_by_in else weight.t()
    return F.linear(x, w_lin, bias)
