"""The estimators' own settings: one small frozen dataclass per estimator, with only its fields.

``VeloraConfig(estimator=...)`` takes one of them (``config.py``). Each
validates its own fields; every subclass of ``EstimatorSettings`` registers
itself in ``ESTIMATORS`` by its ``name``, wherever it is defined, so a new
estimator's settings can live in the new estimator's own file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

__all__ = ["EstimatorSettings", "Velora", "RandomProjection", "Principal", "PrincipalRandom", "Quantized",
           "INIT_MODES", "ESTIMATORS"]  # fmt: skip

#: Ways to choose the projection direction ``v`` of a weight (``Velora.init``).
#:
#: ``batch_average_once``  normalised mean of every sub-token of the first
#:                         training batch, then frozen (the paper's default);
#: ``batch_average``       the same, recomputed on every training step;
#: ``ema``                 exponential moving average of the per-step mean
#:                         direction, ``ema_decay`` the weight of the past;
#: ``random``              a seeded Gaussian direction, reproducible from
#:                         ``seed`` and the weight's name; needs no data.
INIT_MODES = ("batch_average_once", "batch_average", "ema", "random")

_DEFAULT_NUM_GROUPS = 32


def _positive_int(owner: str, name: str, value: Any, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "an int >= 0 (0: never)" if zero_ok else "a positive int"
        raise ValueError(f"{owner}.{name} must be {what}, got {value!r}")


def _fraction(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name} must be in [0, 1), got {value!r}")
    return float(value)


#: The estimators by name (``to_dict`` / ``from_dict``, and the 0.2 spelling ``estimator="random"``): every
#: subclass of ``EstimatorSettings`` registers itself, wherever it is defined.
ESTIMATORS: dict[str, type] = {}


class EstimatorSettings:
    """What every estimator's settings share: a unique ``name`` (its key in ``to_dict()`` and in reports) and a
    JSON round trip. A subclass is a frozen dataclass with only the estimator's own fields."""

    name: ClassVar[str]
    refresh_every: int = 0
    #: the fields that say how much one input keeps (and nothing else): the only ones a per-weight override
    #: (``VeloraConfig(overrides=...)``) may change. They reach the codec through the site's ``basis_shape``.
    SITE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if ESTIMATORS.get(cls.name, cls) is not cls:
            raise ValueError(f"two estimators are named {cls.name!r}: {ESTIMATORS[cls.name]} and {cls}")
        ESTIMATORS[cls.name] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Velora(EstimatorSettings):
    """The paper's estimator (the default): each token split into sub-tokens, each kept as its projection on one
    unit vector ``v`` per weight. A fixed subspace: biased.

    Exactly one of ``num_groups`` and ``sub_token_size`` is given (neither:
    ``num_groups=32``, the paper's and PEFT's default). When ``D`` is not a
    multiple of the sub-token size, the last sub-token of every token is
    zero-padded (as PEFT does): ``d = ceil(D / num_groups)`` and each token
    keeps ``ceil(D / d)`` scalars. A layer whose ``D`` is smaller than
    ``num_groups`` (or than ``sub_token_size``) is left exact and reported.

    Args:
        num_groups: sub-tokens per token.
        sub_token_size: size ``d`` of one sub-token.
        init: how ``v`` is chosen, one of ``INIT_MODES``.
        ema_decay: weight of the past for ``init="ema"``, in ``[0, 1)``.
        refresh_every: recalibrate (``batch_average_once``) or re-seed (``random``) ``v`` every so many training
            steps (0: never); ``batch_average`` / ``ema`` refresh every step already.

    Example::

        >>> Velora(num_groups=16).sub_token_size_for(4096)
        256
    """

    num_groups: Optional[int] = None
    sub_token_size: Optional[int] = None
    init: str = "batch_average_once"
    ema_decay: float = 0.9
    refresh_every: int = 0

    name: ClassVar[str] = "velora"
    SITE_FIELDS: ClassVar[tuple[str, ...]] = ("num_groups", "sub_token_size")

    def __post_init__(self) -> None:
        if self.num_groups is not None and self.sub_token_size is not None:
            raise ValueError(
                "Velora: give num_groups or sub_token_size, not both "
                f"(got num_groups={self.num_groups}, sub_token_size={self.sub_token_size})"
            )
        if self.num_groups is None and self.sub_token_size is None:
            object.__setattr__(self, "num_groups", _DEFAULT_NUM_GROUPS)
        for name in ("num_groups", "sub_token_size"):
            if getattr(self, name) is not None:
                _positive_int("Velora", name, getattr(self, name))
        if self.init not in INIT_MODES:
            raise ValueError(f"Velora.init must be one of {INIT_MODES}, got {self.init!r}")
        object.__setattr__(self, "ema_decay", _fraction("Velora", "ema_decay", self.ema_decay))
        _positive_int("Velora", "refresh_every", self.refresh_every, zero_ok=True)
        if self.refresh_every and self.init in ("batch_average", "ema"):
            raise ValueError(
                f"Velora: init={self.init!r} already refreshes v every step; refresh_every is for "
                "init='batch_average_once' (recalibrate) or 'random' (re-seed)"
            )

    def sub_token_size_for(self, features: int) -> Optional[int]:
        """Sub-token size ``d`` for a last dimension of ``features``; ``None`` if too small to split."""
        if self.sub_token_size is not None:
            return self.sub_token_size if self.sub_token_size <= features else None
        assert self.num_groups is not None  # set in __post_init__
        if self.num_groups > features:
            return None
        return -(-features // self.num_groups)

    def why_not_splittable(self, features: int) -> Optional[str]:
        """Reason an input with last dimension ``features`` cannot be compressed, or ``None``."""
        d = self.sub_token_size_for(features)
        if d is None:
            which = "num_groups" if self.num_groups is not None else "sub_token_size"
            return (f"feature size {features} is smaller than {which} {getattr(self, which)}; "
                    f"use a smaller {which} (or exclude this weight) to compress it")  # fmt: skip
        if d == 1:
            return f"sub-token size 1 for feature size {features}: the projections would be as large as the input"
        return None


@dataclass(frozen=True)
class RandomProjection(EstimatorSettings):
    """The whole token (``d = D``) projected on a random orthonormal basis of ``rank`` columns scaled by
    ``√(D / rank)``: ``E[B Bᵀ] = I``, unbiased; re-seeded every ``refresh_every`` steps (0: never)."""

    rank: int = _DEFAULT_NUM_GROUPS
    refresh_every: int = 0

    name: ClassVar[str] = "random"
    SITE_FIELDS: ClassVar[tuple[str, ...]] = ("rank",)

    def __post_init__(self) -> None:
        _positive_int("RandomProjection", "rank", self.rank)
        _positive_int("RandomProjection", "refresh_every", self.refresh_every, zero_ok=True)


@dataclass(frozen=True)
class Principal(EstimatorSettings):
    """The top-``rank`` eigenvectors of the input's uncentred second moment, from the first batch; followed smoothly
    every ``refresh_every`` steps (a refresh keeps ``refresh_decay`` of the old basis). The lowest error per step;
    biased."""

    rank: int = _DEFAULT_NUM_GROUPS
    refresh_every: int = 0
    refresh_decay: float = 0.5

    name: ClassVar[str] = "principal"
    SITE_FIELDS: ClassVar[tuple[str, ...]] = ("rank",)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _positive_int(owner, "rank", self.rank)
        _positive_int(owner, "refresh_every", self.refresh_every, zero_ok=True)
        object.__setattr__(self, "refresh_decay", _fraction(owner, "refresh_decay", self.refresh_decay))


@dataclass(frozen=True)
class PrincipalRandom(Principal):
    """The top ``rank - random_rank`` principal directions kept exactly, and an unbiased random projection
    (``random_rank`` columns, default ``rank // 2``) of the rest: unbiased, with variance from the residual only."""

    random_rank: Optional[int] = None

    name: ClassVar[str] = "principal_random"
    SITE_FIELDS: ClassVar[tuple[str, ...]] = ()  # a refresh splits the rank by random_rank, one for every weight

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.random_rank is None:
            object.__setattr__(self, "random_rank", self.rank // 2)
        _positive_int("PrincipalRandom", "random_rank", self.random_rank)
        if not self.random_rank < self.rank:
            raise ValueError(
                "PrincipalRandom keeps rank - random_rank principal and random_rank random coordinates per token, "
                f"both at least 1; got rank={self.rank}, random_rank={self.random_rank}"
            )


_BITS = (1, 2, 3, 4, 8)
_ROUNDINGS = ("stochastic", "nearest")
_ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class Quantized(EstimatorSettings):
    """The quantized estimator's own settings: keep every coordinate of the input at ``bits`` bits.

    Given as ``VeloraConfig(estimator=Quantized(...))``. Each token's features
    are cut into groups of ``group_size``; each group keeps a low end and a
    step (two bfloat16 numbers) and each element a ``bits``-bit code, rounded
    stochastically (unbiased: ``E[x̂] = x``) or to the nearest level. An input
    keeps ``bits + 32 / group_size`` bits per element (fp32 keeps 32). The
    random numbers come from a hash of (seed, weight, step, element), never
    from torch's generators. NOTE [quantized weight gradient] in
    ``velora_fx/quantized.py`` has the math.

    Args:
        bits: bits per code, one of ``(1, 2, 3, 4, 8)``.
        group_size: elements sharing one low end and step; a positive multiple of 8.
        rounding: ``"stochastic"`` (the default: unbiased) or ``"nearest"``; a per-weight override
            (``VeloraConfig(overrides=...)``) may set it for some weights only.
        rotation: ``"none"`` (the default) or ``"hadamard"``: each group is multiplied by a Walsh–Hadamard
            matrix with random signs before it is quantized, and back after (``group_size`` must be a power of
            two). It spreads a group's outliers over the whole group, which narrows its range: on an MLP's
            ``down_proj`` (a product of two activations) it cuts the error energy 3–5×, elsewhere it
            changes little (``benchmarks/proxy.py``). It keeps no extra bytes but the 4-byte key, and
            costs one ``G × G`` matmul per group in forward and another in backward; a per-weight override
            (``VeloraConfig(overrides=...)``) can turn it on where it pays.

    Example::

        >>> cfg = VeloraConfig(estimator=Quantized(bits=2))
        >>> cfg.estimator_name, VeloraConfig.from_dict(cfg.to_dict()) == cfg
        ('quantized', True)
    """

    bits: int = 2
    group_size: int = 32
    rounding: str = "stochastic"
    rotation: str = "none"

    name: ClassVar[str] = "quantized"
    SITE_FIELDS: ClassVar[tuple[str, ...]] = ("bits", "group_size", "rounding", "rotation")

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in _BITS:
            raise ValueError(f"Quantized.bits must be one of {_BITS}, got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 8 or gs % 8:
            raise ValueError(f"Quantized.group_size must be a positive multiple of 8 (codes pack 8 at a time), got {gs!r}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"Quantized.rounding must be one of {_ROUNDINGS}, got {self.rounding!r}")
        if self.rotation not in _ROTATIONS:
            raise ValueError(f"Quantized.rotation must be one of {_ROTATIONS}, got {self.rotation!r}")
        if self.rotation == "hadamard" and gs & (gs - 1):
            raise ValueError(
                f"Quantized(rotation='hadamard') rotates each group by a Walsh–Hadamard matrix, which exists for "
                f"sizes that are powers of two; group_size={gs} is not: use {1 << (gs.bit_length() - 1)} or "
                f"{1 << gs.bit_length()}"
            )

    @property
    def bits_per_element(self) -> float:
        """What an input keeps per element: the code and its share of the group's two bfloat16 numbers."""
        return self.bits + 32 / self.group_size
