"""``VeloraConfig``: what to compress and how, validated once, frozen."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ["VeloraConfig", "Quantized", "INIT_MODES", "ESTIMATORS"]

#: Ways to choose the projection direction ``v`` of a weight.
#:
#: ``batch_average_once``  normalised mean of every sub-token of the first
#:                         training batch, then frozen (the paper's default);
#: ``batch_average``       the same, recomputed on every training step;
#: ``ema``                 exponential moving average of the per-step mean
#:                         direction, ``ema_decay`` the weight of the past;
#: ``random``              a seeded Gaussian direction, reproducible from
#:                         ``seed`` and the weight's name; needs no data.
INIT_MODES = ("batch_average_once", "batch_average", "ema", "random")

#: How the input of a weight is kept for its gradient (see ``velora_fx/estimators.py``). Each keeps ``p = x B``,
#: a basis ``B`` of shape ``(d, r)``, and forms ``dW = (gᵀ p) Bᵀ``:
#:
#: ``velora``            the paper: sub-tokens of ``d = D / num_groups``, ``B`` one unit vector ``v`` (``r = 1``,
#:                       ``init`` chooses it). A fixed subspace: biased.
#: ``random``            the whole token (``d = D``), ``B`` a random orthonormal basis of ``rank`` columns scaled
#:                       by ``√(D / rank)``: ``E[B Bᵀ] = I``, unbiased; re-seeded every ``refresh_every`` steps.
#: ``principal``         ``B`` = the top-``rank`` eigenvectors of the input's uncentred second moment, from the
#:                       first batch; followed smoothly every ``refresh_every`` steps. The lowest error per step;
#:                       biased.
#: ``principal_random``  the top ``rank - random_rank`` principal directions kept exactly, and an unbiased random
#:                       projection (``random_rank`` columns) of the rest of the input: unbiased, with variance
#:                       from the residual's energy only.
ESTIMATORS = ("velora", "random", "principal", "principal_random")

_BITS = (1, 2, 3, 4, 8)
_ROUNDINGS = ("stochastic", "nearest")


@dataclass(frozen=True)
class Quantized:
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
        rounding: ``"stochastic"`` (the default: unbiased) or ``"nearest"``.

    Example::

        >>> cfg = VeloraConfig(estimator=Quantized(bits=2))
        >>> cfg.estimator_name, VeloraConfig.from_dict(cfg.to_dict()) == cfg
        ('quantized', True)
    """

    bits: int = 2
    group_size: int = 32
    rounding: str = "stochastic"

    name = "quantized"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in _BITS:
            raise ValueError(f"Quantized.bits must be one of {_BITS}, got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 8 or gs % 8:
            raise ValueError(f"Quantized.group_size must be a positive multiple of 8 (codes pack 8 at a time), got {gs!r}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"Quantized.rounding must be one of {_ROUNDINGS}, got {self.rounding!r}")

    @property
    def bits_per_element(self) -> float:
        """What an input keeps per element: the code and its share of the group's two bfloat16 numbers."""
        return self.bits + 32 / self.group_size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

_DEFAULT_NUM_GROUPS = 32


def _as_patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ValueError(f"VeloraConfig.{what} must be a string or a sequence of glob patterns, got {value!r}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"VeloraConfig.{what} must hold glob patterns (str), got {p!r}")
    return patterns


@dataclass(frozen=True)
class VeloraConfig:
    """How velora_fx compresses the inputs that linear layers keep for ``dW``.

    Each token of a compressed input (its last dimension, of size ``D``) is
    split into sub-tokens of size ``d``; only the projection of each sub-token
    onto a fixed unit vector ``v`` (one per weight) is kept for backward.

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
        seed: seed of ``init="random"``.
        scale: factor on the approximate weight gradient only (``dx`` and
            ``db`` stay exact), positive. The paper uses 0.1 for LLaMA-7B + LoRA.
        min_saved_bytes: inputs that would keep fewer bytes than this for
            backward stay exact.
        include: glob patterns on qualified parameter names (as in
            ``model.named_parameters()``); only matching weights are
            compressed. ``("*.v_proj.weight", "*.down_proj.weight")`` is the
            paper's value-and-down-projection policy.
        exclude: glob patterns; matching weights stay exact (wins over
            ``include``).
        estimator: how an input is kept for ``dW``: one of ``ESTIMATORS`` (a
            projection), or ``Quantized(bits, group_size, rounding)`` (every
            coordinate at a few bits).
        rank: scalars kept per token by the token-level projections
            (default ``num_groups``: VeLoRA's bytes).
        random_rank: how many of them are random (``principal_random``).
        refresh_every: re-seed / follow / recalibrate a projection every so
            many training steps (0: never).
        refresh_decay: how much of the old principal basis a refresh keeps.
        memory_budget: the min-cut partitioner's activation memory budget
            (``torch._functorch.config.activation_memory_budget``) for the
            graphs this backend compiles, in ``(0, 1]``: the fraction of the
            bytes the default partition keeps for backward that the
            partitioner may keep, recomputing the rest in backward (``None``:
            torch's setting, 1.0 by default: recompute only what is free).
            Scoped to velora_fx's compiles and part of the compile-cache key.

    Example::

        >>> cfg = VeloraConfig(num_groups=16, include=("*.down_proj.weight",))
        >>> cfg.sub_token_size_for(4096)
        256
        >>> VeloraConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    num_groups: Optional[int] = None
    sub_token_size: Optional[int] = None
    init: str = "batch_average_once"
    ema_decay: float = 0.9
    seed: int = 0
    scale: float = 1.0
    min_saved_bytes: int = 0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    memory_budget: Optional[float] = None
    estimator: Union[str, Quantized] = "velora"
    rank: Optional[int] = None
    random_rank: Optional[int] = None
    refresh_every: int = 0
    refresh_decay: float = 0.5

    def __post_init__(self) -> None:
        if self.num_groups is not None and self.sub_token_size is not None:
            raise ValueError(
                "VeloraConfig: give num_groups or sub_token_size, not both "
                f"(got num_groups={self.num_groups}, sub_token_size={self.sub_token_size})"
            )
        if self.num_groups is None and self.sub_token_size is None:
            object.__setattr__(self, "num_groups", _DEFAULT_NUM_GROUPS)
        for name in ("num_groups", "sub_token_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"VeloraConfig.{name} must be a positive int, got {value!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"VeloraConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        if not isinstance(self.ema_decay, (int, float)) or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"VeloraConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"VeloraConfig.seed must be an int, got {self.seed!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
            math.isfinite(self.scale) and self.scale > 0
        ):
            raise ValueError(
                f"VeloraConfig.scale must be a positive finite number (a factor on the approximate dW: 0 would "
                f"freeze the weight, a negative one reverse its updates), got {self.scale!r}; to keep a weight exact, "
                "exclude it (VeloraConfig(exclude=...))"
            )
        if isinstance(self.min_saved_bytes, bool) or not isinstance(self.min_saved_bytes, int) or self.min_saved_bytes < 0:
            raise ValueError(f"VeloraConfig.min_saved_bytes must be an int >= 0, got {self.min_saved_bytes!r}")
        if self.memory_budget is not None:
            if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, (int, float)) or not (
                0.0 < self.memory_budget <= 1.0
            ):
                raise ValueError(
                    f"VeloraConfig.memory_budget must be None or a number in (0, 1] (the fraction of the default "
                    f"partition's saved bytes the partitioner may keep), got {self.memory_budget!r}"
                )
            object.__setattr__(self, "memory_budget", float(self.memory_budget))
        self._check_estimator()
        object.__setattr__(self, "include", _as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "ema_decay", float(self.ema_decay))
        object.__setattr__(self, "refresh_decay", float(self.refresh_decay))

    @property
    def estimator_name(self) -> str:
        """The estimator's name: one of ``ESTIMATORS``, or ``"quantized"``."""
        return self.estimator if isinstance(self.estimator, str) else self.estimator.name

    def _check_estimator(self) -> None:
        if isinstance(self.estimator, dict):  # from JSON
            fields = dict(self.estimator)
            if fields.pop("name", None) != Quantized.name:
                raise ValueError(f"VeloraConfig.estimator as a dict must be Quantized(...).to_dict(), got {self.estimator!r}")
            object.__setattr__(self, "estimator", Quantized(**fields))
        if isinstance(self.estimator, Quantized):
            given = {name: getattr(self, name) for name in ("sub_token_size", "rank", "random_rank") if getattr(self, name)}
            if self.init != "batch_average_once":
                given["init"] = self.init
            if self.refresh_every:
                given["refresh_every"] = self.refresh_every
            if given:
                raise ValueError(
                    f"VeloraConfig: {given} set how a projection is chosen; estimator=Quantized(...) keeps every "
                    "coordinate (its settings are bits, group_size and rounding) and draws new random numbers every "
                    "step by itself"
                )
            return
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"VeloraConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("rank", "random_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"VeloraConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 0:
            raise ValueError(f"VeloraConfig.refresh_every must be an int >= 0 (0: never), got {self.refresh_every!r}")
        if not isinstance(self.refresh_decay, (int, float)) or not 0.0 <= self.refresh_decay < 1.0:
            raise ValueError(f"VeloraConfig.refresh_decay must be in [0, 1), got {self.refresh_decay!r}")
        if self.estimator == "velora":
            if self.rank is not None or self.random_rank is not None:
                raise ValueError(
                    "VeloraConfig: rank / random_rank set the scalars per token of the token-level estimators; "
                    f"estimator='velora' keeps num_groups of them (got rank={self.rank}, random_rank={self.random_rank})"
                )
            if self.refresh_every and self.init in ("batch_average", "ema"):
                raise ValueError(
                    f"VeloraConfig: init={self.init!r} already refreshes v every step; refresh_every is for "
                    "init='batch_average_once' (recalibrate) or 'random' (re-seed)"
                )
            return
        if self.init != "batch_average_once":
            raise ValueError(
                f"VeloraConfig.init chooses VeLoRA's direction; estimator={self.estimator!r} has no init "
                f"(got init={self.init!r})"
            )
        if self.sub_token_size is not None:
            raise ValueError(
                f"VeloraConfig: estimator={self.estimator!r} projects whole tokens; give rank (scalars per token), "
                f"not sub_token_size (got {self.sub_token_size})"
            )
        if self.rank is None:
            object.__setattr__(self, "rank", self.num_groups)  # VeLoRA's bytes at the same num_groups
        if self.estimator == "principal_random":
            if self.random_rank is None:
                object.__setattr__(self, "random_rank", self.rank // 2)
            if not 1 <= self.random_rank < self.rank:
                raise ValueError(
                    "VeloraConfig: principal_random keeps rank - random_rank principal and random_rank random "
                    f"coordinates per token, both at least 1; got rank={self.rank}, random_rank={self.random_rank}"
                )
        elif self.random_rank is not None:
            raise ValueError(f"VeloraConfig.random_rank is for estimator='principal_random', not {self.estimator!r}")

    # -- per-layer decisions --------------------------------------------------

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
                    f"use a smaller {which} (or exclude this weight) to compress it")
        if d == 1:
            return f"sub-token size 1 for feature size {features}: the projections would be as large as the input"
        return None

    def why_excluded(self, param_name: str) -> Optional[str]:
        """Reason the weight named ``param_name`` must stay exact by pattern, or ``None``."""
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(param_name, pattern):
                return f"excluded by pattern {pattern!r}"
        if not any(fnmatch.fnmatchcase(param_name, p) for p in self.include):
            return f"matches no include pattern {self.include!r}"
        return None

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict; ``VeloraConfig.from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        if isinstance(self.estimator, Quantized):
            out["estimator"] = self.estimator.to_dict()
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VeloraConfig":
        """Build a config from ``to_dict()``'s output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"VeloraConfig.from_dict: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**data)
