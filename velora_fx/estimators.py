"""How each weight-gradient estimator sizes, initialises, calibrates and refreshes its basis, for both routes.

An estimator keeps, per token of a compressed input, the coordinates ``p`` of
its sub-tokens in a basis ``B`` of shape ``(d, r)`` (NOTE [VeLoRA weight
gradient] in ``ops.py``), and the weight gradient is ``(gᵀ p) Bᵀ``, so every
estimator is the same two matmuls in the graph: only ``B`` differs. This
module answers, for one weight: which ``(d, r)`` (or why the weight cannot be
compressed), what state it keeps, what the state starts as, how a first batch
calibrates it, and how a refresh (every ``refresh_every`` training steps)
moves it.

Calibration and refresh go through *statistics* that add up over batches and
over ranks (one ``all_reduce`` under ``torch.distributed``, NOTE [one basis on
every rank] in ``runtime.py``), so every rank ends with the same basis.

NOTE [bias and variance of the estimators]
``dŴ = dW P`` with ``P = B Bᵀ`` (blockwise). With a fixed ``B`` whose columns
are orthonormal (VeLoRA's ``v``, the principal basis ``U``), ``P`` is an
orthogonal projection: ``dŴ`` is ``dW`` projected on a fixed subspace, a bias
that no number of steps averages out. With ``B`` random and ``E[B Bᵀ] = I``,
``E[dŴ] = dW``: unbiased, and the noise averages out over steps. We draw
``B = Q √(D/k)``, ``Q`` an orthonormal basis of a uniformly random
``k``-dimensional subspace (lower variance than i.i.d. Gaussian columns at the
same ``k``). ``principal_random`` keeps ``U`` (``k₁`` columns) exactly and a
random orthonormal ``Q`` of ``k₂`` columns inside the orthogonal complement of
``U``, scaled by ``√((D − k₁)/k₂)``: ``E[B Bᵀ] = U Uᵀ + (I − U Uᵀ) = I``, so it
is unbiased too, and its variance comes only from the part of the input
outside ``U`` — small when the input's energy is concentrated, as real
activations' is.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import ops, projection_graph
from .codec import Estimator
from .config import Principal, PrincipalRandom, Quantized, RandomProjection, Velora, VeloraConfig
from .quantized import QuantizedCodec

__all__ = ["Estimator", "ProjectionCodec", "VeloraCodec", "RandomCodec", "PrincipalCodec", "PrincipalRandomCodec",
           "QuantizedCodec", "CODECS", "for_config", "for_weight"]  # fmt: skip


def _finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"velora_fx: the calibration batch of {name} holds NaN or inf, so no projection basis can be computed "
            "from it; calibrate on a finite batch (velora_fx.calibrate(model, batch)) or exclude this layer "
            "(VeloraConfig(exclude=...))"
        )


def _orthonormal_random(rows: int, cols: int, seed: int, name: str, index: int,
                        against: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """An orthonormal ``(rows, cols)`` basis of a uniformly random subspace (float64), seeded by ``(seed, name,
    index)``; inside the orthogonal complement of ``against``'s columns when given."""
    g = torch.Generator().manual_seed(ops.seed_for(seed, name, index))
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if against is not None:
        z = z - against @ (against.t() @ z)
    q, r = torch.linalg.qr(z)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)  # the unique Q with a positive R diagonal


def _top_eigenvectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` eigenvectors of the symmetric ``m`` with the largest eigenvalues, largest first, signs fixed."""
    _, vecs = torch.linalg.eigh(m)
    u = vecs[:, -k:].flip(-1)
    return _fix_signs(u)


def _fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Each column with its largest-magnitude entry positive: a deterministic choice among ``±u``."""
    idx = u.abs().argmax(0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


def _aligned(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new``'s columns with the signs that point them the way ``old``'s go (so that averaging them is smooth)."""
    signs = torch.sign((new * old).sum(0))
    return new * torch.where(signs == 0, torch.ones_like(signs), signs)


def _smooth_subspace_step(u: torch.Tensor, mu: torch.Tensor, decay: float) -> torch.Tensor:
    """One warm-started subspace iteration ``orth(M U)``, averaged with the current ``U`` (weight ``decay``), then
    re-orthonormalised: the basis follows the principal subspace of the stream of batches, smoothly."""
    step, _ = torch.linalg.qr(mu)
    step = _aligned(step, u)
    mixed, _ = torch.linalg.qr(decay * u + (1.0 - decay) * step)
    return _aligned(mixed, u)


class ProjectionCodec(Estimator):
    """Keep ``p = x_sub B`` (sub-tokens of ``d`` in a basis ``B`` of shape ``(d, r)``) and form
    ``dW = (gᵀ p) Bᵀ``; the subclasses differ only in how ``B`` is chosen. Defaults: whole tokens (``d = D``),
    ``r = rank``, calibration statistics ``XᵀX``."""

    source_modules = ("velora_fx.projection_graph",)

    def basis_shape(self, features: int):
        k = self.config.estimator.rank
        if k >= features:
            return None, (f"feature size {features} is not larger than rank {k}: the projection would keep as much "
                          "as the input; use a smaller rank (or exclude this weight) to compress it")  # fmt: skip
        return (features, k), ""

    def statistics(self, x: torch.Tensor, basis_shape):
        x64 = x.detach().double()
        return x64.t() @ x64, x.shape[0]

    # the codec: eagerly (ops.py), and in a joint graph (projection_graph.py)

    def encode(self, x, state, basis_shape):
        return (ops.project(x, state),)

    def decode(self, saved, state, basis_shape, features, dtype):
        return ops.reconstruct(saved[0], state, features).to(dtype)

    def weight_grad(self, g, saved, state, basis_shape, features):
        return ops.weight_grad(g, saved[0].reshape(g.shape[0], -1), state, features)

    def emit_encode(self, w, x, state, basis_shape):
        return projection_graph.encode(w, x, state)

    def emit_weight_grad(self, w, g, rows, saved, state, basis_shape, features, scale):
        return projection_graph.weight_grad(w, g, rows, saved[0], state, features, scale)

    def emit_decode(self, w, x, saved, state, basis_shape, scale):
        return projection_graph.decode(w, x, saved[0], state, scale)

    def kept_bytes(self, shape, dtype, basis_shape) -> int:
        """``p``: ``N · n · r`` elements of ``dtype``."""
        d, r = basis_shape
        features = int(shape[-1]) if len(shape) else 1
        numel = math.prod(int(s) for s in shape)
        tokens = numel // features if features else 0
        return tokens * (-(-features // d)) * r * torch.empty((), dtype=dtype).element_size()

    def per_token(self, features: int, basis_shape) -> float:
        d, r = basis_shape
        return -(-features // d) * r


class VeloraCodec(ProjectionCodec):
    """VeLoRA (the paper's, the default): one unit direction ``v`` per weight, ``d = ceil(D / num_groups)``, ``r = 1``.

    State: ``v`` of shape ``(d,)``. ``init`` chooses it: the normalised mean
    sub-token of the first batch (``batch_average_once``; refreshed every step
    by ``batch_average`` / ``ema``, inside the compiled graph), or a seeded
    random direction (``random``, calibrated from the start). With
    ``refresh_every``, ``batch_average_once`` recalibrates ``v`` on the batch of
    every refresh step, ``random`` re-seeds it.
    """

    field = "v"

    @property
    def refreshed_in_graph(self) -> bool:
        return self.config.estimator.init in ("batch_average", "ema")

    @property
    def shares_per_input(self) -> bool:
        return self.config.estimator.init != "random"

    @property
    def refresh_needs_data(self) -> bool:
        return self.config.estimator.init != "random"

    def basis_shape(self, features: int):
        reason = self.config.estimator.why_not_splittable(features)
        if reason:
            return None, reason
        return (self.config.estimator.sub_token_size_for(features), 1), ""

    def state_shape(self, basis_shape) -> tuple[int, ...]:
        return (basis_shape[0],)

    def initial(self, basis_shape, name: str):
        d = basis_shape[0]
        if self.config.estimator.init == "random":
            return ops.random_direction(d, self.config.seed, name), self._step()
        return torch.zeros(d, dtype=torch.float32), self._step()

    def statistics(self, x: torch.Tensor, basis_shape):
        d = basis_shape[0]
        count = x.shape[0] * (-(-x.shape[-1] // d))
        return ops.sub_token_mean(x, d).double() * count, count

    def calibrated(self, total, count, name, basis_shape):
        if count == 0:
            return None
        return ops.direction_from_mean((total / count).float(), name)

    def refreshed(self, basis, total, count, name, index):
        if self.config.estimator.init == "random":
            return ops.random_direction(basis.shape[0], self.config.seed, name, index)
        return basis if count == 0 else ops.direction_from_mean((total / count).float(), name)


class RandomCodec(ProjectionCodec):
    """``B = Q √(D/k)``, ``Q`` a seeded random orthonormal ``(D, k)`` basis: unbiased (NOTE [bias and variance of the
    estimators]); calibrated from the start, re-seeded every ``refresh_every`` steps."""

    def initial(self, basis_shape, name: str):
        return self._basis(basis_shape, name, 0), self._step()

    def _basis(self, basis_shape, name: str, index: int) -> torch.Tensor:
        d, k = basis_shape
        return (_orthonormal_random(d, k, self.config.seed, name, index) * math.sqrt(d / k)).float()

    def calibrated(self, total, count, name, basis_shape):
        return self._basis(basis_shape, name, 0)

    def refreshed(self, basis, total, count, name, index):
        return self._basis(tuple(basis.shape), name, index)


class PrincipalCodec(ProjectionCodec):
    """``B = U``, the top-``rank`` eigenvectors of the first batch's uncentred second moment ``XᵀX / N``; every
    ``refresh_every`` steps one warm-started subspace iteration on the batch at hand, averaged with the current
    ``U`` (``refresh_decay``), moves it smoothly."""

    @property
    def refresh_needs_data(self) -> bool:
        return True

    def calibrated(self, total, count, name, basis_shape):
        if count == 0:
            return None
        _finite(total, name)
        return _top_eigenvectors(total / count, self._principal_rank(basis_shape)).float()

    def _principal_rank(self, basis_shape) -> int:
        return basis_shape[1]

    def refresh_statistics(self, x, basis):
        x64 = x.detach().double()
        u = basis[:, : self._principal_rank(tuple(basis.shape))].to(x64)
        return x64.t() @ (x64 @ u), x.shape[0]

    def refreshed(self, basis, total, count, name, index):
        if count == 0 or not bool(torch.isfinite(total).all()):
            return basis  # nothing usable in this batch: keep following from the next refresh
        return _smooth_subspace_step(basis.double(), total / count, self.config.estimator.refresh_decay).float()


class PrincipalRandomCodec(PrincipalCodec):
    """``B = [U, Q √((D − k₁)/k₂)]``: the top ``k₁ = rank − random_rank`` principal directions, and a seeded random
    orthonormal basis ``Q`` of ``k₂ = random_rank`` directions in their orthogonal complement: unbiased, with
    variance from the residual only (NOTE [bias and variance of the estimators]). A refresh moves ``U`` as
    ``principal`` does and re-seeds ``Q`` in the new complement."""

    def _principal_rank(self, basis_shape) -> int:
        return basis_shape[1] - self.config.estimator.random_rank

    def calibrated(self, total, count, name, basis_shape):
        u = super().calibrated(total, count, name, basis_shape)
        return None if u is None else self._with_residual(u.double(), basis_shape, name, 0)

    def _with_residual(self, u: torch.Tensor, basis_shape, name: str, index: int) -> torch.Tensor:
        d, k = basis_shape
        k1, k2 = k - self.config.estimator.random_rank, self.config.estimator.random_rank
        q = _orthonormal_random(d, k2, self.config.seed, name, index, against=u)
        return torch.cat([u, q * math.sqrt((d - k1) / k2)], dim=1).float()

    def refreshed(self, basis, total, count, name, index):
        k1 = self._principal_rank(tuple(basis.shape))
        u = basis[:, :k1].double()
        if count and bool(torch.isfinite(total).all()):
            u = _smooth_subspace_step(u, total / count, self.config.estimator.refresh_decay)
        return self._with_residual(u, tuple(basis.shape), name, index)


#: the codec of each estimator's settings: adding an estimator adds one line here
CODECS: dict[type, type[Estimator]] = {
    Velora: VeloraCodec,
    RandomProjection: RandomCodec,
    Principal: PrincipalCodec,
    PrincipalRandom: PrincipalRandomCodec,
    Quantized: QuantizedCodec,
}


@functools.lru_cache(maxsize=64)
def for_config(config: VeloraConfig) -> Estimator:
    """The codec of a config's estimator (one object per config: the FX route asks on every call of a site, and a
    codec is stateless given its config)."""
    return CODECS[type(config.estimator)](config)


def for_weight(config: VeloraConfig, weight: str) -> Estimator:
    """The codec of the weight named ``weight``: the config's estimator with that weight's own sizes
    (``VeloraConfig.overrides``). Ask it for the site's ``basis_shape`` only; everything else is ``for_config``'s."""
    return for_config(config.for_weight(weight))
