"""``VeloraConfig``: what to compress and how, validated once, frozen.

The config has a common part (which weights, ``scale``, ``seed``,
``min_saved_bytes``, ``memory_budget``) and one estimator, given as a small
frozen dataclass with only its own fields, in torchao's style
(``quantize_(model, Int4WeightOnlyConfig(group_size=32))``)::

    VeloraConfig()                                                  # the paper's VeLoRA: Velora(num_groups=32)
    VeloraConfig(estimator=Velora(num_groups=16, init="ema"))
    VeloraConfig(estimator=RandomProjection(rank=32, refresh_every=100), exclude=("lm_head.weight",))
    VeloraConfig(estimator=Quantized(bits=2))

Each estimator validates its own fields; nothing in the common part depends
on which estimator is chosen. The flat spellings of 0.2
(``VeloraConfig(num_groups=16)``, ``VeloraConfig(estimator="random",
rank=32)``) still work in 0.3, with a ``DeprecationWarning`` that gives the
new spelling, and are removed in 0.4.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

__all__ = ["VeloraConfig", "Velora", "RandomProjection", "Principal", "PrincipalRandom", "Quantized", "INIT_MODES",
           "ESTIMATORS"]  # fmt: skip

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


class _Estimator:
    """What every estimator's settings share: a ``name`` and a JSON round trip."""

    name: ClassVar[str]
    refresh_every: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Velora(_Estimator):
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
class RandomProjection(_Estimator):
    """The whole token (``d = D``) projected on a random orthonormal basis of ``rank`` columns scaled by
    ``√(D / rank)``: ``E[B Bᵀ] = I``, unbiased; re-seeded every ``refresh_every`` steps (0: never)."""

    rank: int = _DEFAULT_NUM_GROUPS
    refresh_every: int = 0

    name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        _positive_int("RandomProjection", "rank", self.rank)
        _positive_int("RandomProjection", "refresh_every", self.refresh_every, zero_ok=True)


@dataclass(frozen=True)
class Principal(_Estimator):
    """The top-``rank`` eigenvectors of the input's uncentred second moment, from the first batch; followed smoothly
    every ``refresh_every`` steps (a refresh keeps ``refresh_decay`` of the old basis). The lowest error per step;
    biased."""

    rank: int = _DEFAULT_NUM_GROUPS
    refresh_every: int = 0
    refresh_decay: float = 0.5

    name: ClassVar[str] = "principal"

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


@dataclass(frozen=True)
class Quantized(_Estimator):
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

    name: ClassVar[str] = "quantized"

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


#: The estimators by name (``to_dict`` / ``from_dict``, and the 0.2 spelling ``estimator="random"``).
ESTIMATORS: dict[str, type] = {c.name: c for c in (Velora, RandomProjection, Principal, PrincipalRandom, Quantized)}

EstimatorSettings = Union[Velora, RandomProjection, Principal, PrincipalRandom, Quantized]

#: the flat fields of 0.2, now fields of the estimators, with their 0.2 defaults
_LEGACY_DEFAULTS = {"num_groups": None, "sub_token_size": None, "init": "batch_average_once", "ema_decay": 0.9,
                    "rank": None, "random_rank": None, "refresh_every": 0, "refresh_decay": 0.5}  # fmt: skip
_LEGACY = tuple(_LEGACY_DEFAULTS)


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


@dataclass(frozen=True, init=False)
class VeloraConfig:
    """How velora_fx compresses the inputs that linear layers keep for ``dW``: which weights, and the estimator.

    Args:
        estimator: how an input is kept for ``dW``: ``Velora(...)`` (the
            default: the paper's), ``RandomProjection(...)``,
            ``Principal(...)``, ``PrincipalRandom(...)`` (projections), or
            ``Quantized(...)`` (every coordinate at a few bits). Each has
            only its own fields.
        seed: seed of every random choice (VeLoRA's ``init="random"``, the
            random bases, the quantized estimator's rounding).
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
        memory_budget: the min-cut partitioner's activation memory budget
            (``torch._functorch.config.activation_memory_budget``) for the
            graphs this backend compiles, in ``(0, 1]``: the fraction of the
            bytes the default partition keeps for backward that the
            partitioner may keep, recomputing the rest in backward (``None``:
            torch's setting, 1.0 by default: recompute only what is free).
            Scoped to velora_fx's compiles and part of the compile-cache key.
            A common field, not an estimator's: it is how the partitioner
            trades recompute for memory, whatever the estimator keeps.

    The 0.2 spellings (``num_groups=``, ``sub_token_size=``, ``init=``,
    ``ema_decay=``, ``rank=``, ``random_rank=``, ``refresh_every=``,
    ``refresh_decay=``, ``estimator="random"``) still work, with a
    ``DeprecationWarning``; they are read back as properties
    (``cfg.num_groups``: the estimator's field, ``None`` where it has none).

    Example::

        >>> cfg = VeloraConfig(estimator=Velora(num_groups=16), include=("*.down_proj.weight",))
        >>> cfg.estimator.sub_token_size_for(4096)
        256
        >>> VeloraConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    estimator: EstimatorSettings
    seed: int
    scale: float
    min_saved_bytes: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    memory_budget: Optional[float]

    def __init__(self, estimator: Union[EstimatorSettings, str, dict, None] = None, *, seed: int = 0,
                 scale: float = 1.0, min_saved_bytes: int = 0, include: Any = ("*",), exclude: Any = (),
                 memory_budget: Optional[float] = None, **legacy: Any):  # fmt: skip
        unknown = set(legacy) - set(_LEGACY)
        if unknown:
            raise TypeError(f"VeloraConfig got unexpected keyword arguments {sorted(unknown)}")
        settings = _estimator_settings(estimator, legacy)
        fields = {"estimator": settings, "seed": seed, "scale": scale, "min_saved_bytes": min_saved_bytes,
                  "include": _as_patterns(include, "include"), "exclude": _as_patterns(exclude, "exclude"),
                  "memory_budget": memory_budget}  # fmt: skip
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
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
        object.__setattr__(self, "scale", float(self.scale))
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

    @property
    def estimator_name(self) -> str:
        """The estimator's name: a key of ``ESTIMATORS``."""
        return self.estimator.name

    # -- per-layer decisions --------------------------------------------------

    def why_excluded(self, param_name: str) -> Optional[str]:
        """Reason the weight named ``param_name`` must stay exact by pattern, or ``None``."""
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(param_name, pattern):
                return f"excluded by pattern {pattern!r}"
        if not any(fnmatch.fnmatchcase(param_name, p) for p in self.include):
            return f"matches no include pattern {self.include!r}"
        return None

    # -- the 0.2 fields, read back from the estimator ------------------------------------------------

    def _field(self, name: str, default: Any = None) -> Any:
        return getattr(self.estimator, name, default)

    num_groups = property(lambda self: self._field("num_groups"), doc="``Velora.num_groups`` (``None``: not VeLoRA).")
    sub_token_size = property(lambda self: self._field("sub_token_size"), doc="``Velora.sub_token_size``.")
    init = property(lambda self: self._field("init", "batch_average_once"), doc="``Velora.init``.")
    ema_decay = property(lambda self: self._field("ema_decay", 0.9), doc="``Velora.ema_decay``.")
    rank = property(lambda self: self._field("rank"), doc="The token-level projections' ``rank``.")
    random_rank = property(lambda self: self._field("random_rank"), doc="``PrincipalRandom.random_rank``.")
    refresh_every = property(lambda self: self._field("refresh_every", 0), doc="The estimator's ``refresh_every``.")
    refresh_decay = property(lambda self: self._field("refresh_decay", 0.5), doc="``Principal.refresh_decay``.")

    def sub_token_size_for(self, features: int) -> Optional[int]:
        """VeLoRA's sub-token size for ``features`` (``Velora.sub_token_size_for``)."""
        return self._velora("sub_token_size_for").sub_token_size_for(features)

    def why_not_splittable(self, features: int) -> Optional[str]:
        """``Velora.why_not_splittable``."""
        return self._velora("why_not_splittable").why_not_splittable(features)

    def _velora(self, what: str) -> Velora:
        if not isinstance(self.estimator, Velora):
            raise AttributeError(f"VeloraConfig.{what} is VeLoRA's; this config's estimator is {self.estimator_name!r}")
        return self.estimator

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict; ``VeloraConfig.from_dict`` inverts it."""
        return {"estimator": self.estimator.to_dict(), "seed": self.seed, "scale": self.scale,
                "min_saved_bytes": self.min_saved_bytes, "include": list(self.include),
                "exclude": list(self.exclude), "memory_budget": self.memory_budget}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VeloraConfig":
        """Build a config from ``to_dict()``'s output (or 0.2's flat one); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)} | set(_LEGACY)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"VeloraConfig.from_dict: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        data = dict(data)
        legacy = {k: data.pop(k) for k in _LEGACY if k in data}
        with warnings.catch_warnings():  # a stored 0.2 config is not the user's spelling
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls(**data, **_stored_legacy(data.get("estimator"), legacy))


def _stored_legacy(estimator: Any, legacy: dict[str, Any]) -> dict[str, Any]:
    """The flat fields of a stored 0.2 config that are not its estimator's defaults (0.2 wrote them all)."""
    if not legacy:
        return {}
    name = estimator.get("name", "velora") if isinstance(estimator, dict) else (estimator or "velora")
    cls = ESTIMATORS.get(name)
    own = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    return {k: v for k, v in legacy.items() if k in own and v is not None}


def _owners(field: str) -> str:
    """The estimators that have ``field``, for an error message."""
    return " and ".join(c.__name__ for c in ESTIMATORS.values() if field in {f.name for f in dataclasses.fields(c)})


def _estimator_settings(estimator: Any, legacy: dict[str, Any]) -> EstimatorSettings:
    """The estimator's settings from ``estimator`` (an object, a name of 0.2, a dict of ``to_dict``, or ``None``:
    VeLoRA) and the flat fields of 0.2 (deprecated)."""
    if isinstance(estimator, dict):  # from JSON
        fields = dict(estimator)
        cls = ESTIMATORS.get(fields.pop("name", None))
        if cls is None:
            raise ValueError(
                f"VeloraConfig.estimator as a dict must be the to_dict() of Velora, RandomProjection, Principal, "
                f"PrincipalRandom or Quantized (its 'name' one of {sorted(ESTIMATORS)}), got {estimator!r}"
            )
        estimator = cls(**fields)
    if isinstance(estimator, tuple(ESTIMATORS.values())):
        if legacy:
            k = next(iter(legacy))
            has = k in {f.name for f in dataclasses.fields(estimator)}
            raise ValueError(
                f"VeloraConfig: {k} is a field of {_owners(k)}, not of VeloraConfig; "
                + (f"give it to the estimator: {type(estimator).__name__}({k}={legacy[k]!r})" if has else
                   f"this config's estimator={type(estimator).__name__}(...) has no {k}")  # fmt: skip
            )
        return estimator
    name = "velora" if estimator is None else estimator
    if not isinstance(name, str) or name not in ESTIMATORS or name == "quantized":
        raise ValueError(
            f"VeloraConfig.estimator must be Velora(...), RandomProjection(...), Principal(...), PrincipalRandom(...) "
            f"or Quantized(...), got {estimator!r}"
        )
    cls = ESTIMATORS[name]
    own = {f.name for f in dataclasses.fields(cls)}
    legacy = dict(legacy)
    if cls is not Velora and legacy.get("num_groups") is not None:  # 0.2: rank defaulted to num_groups
        legacy.setdefault("rank", legacy["num_groups"])
        legacy.pop("num_groups")
    foreign = {k: v for k, v in legacy.items() if k not in own and v != _LEGACY_DEFAULTS[k]}  # 0.2 ignored defaults
    if foreign:
        k = next(iter(foreign))
        raise ValueError(f"VeloraConfig: {k} is a field of {_owners(k)}, not of {cls.__name__} (estimator={name!r})")
    mine = {k: v for k, v in legacy.items() if k in own}
    if estimator is not None or legacy:
        spelled = ", ".join(f"{k}={v!r}" for k, v in mine.items())
        warnings.warn(
            f"VeloraConfig({'estimator=' + repr(name) + (', ' if legacy else '') if estimator is not None else ''}"
            f"{', '.join(f'{k}=...' for k in legacy)}) is the 0.2 spelling; write "
            f"VeloraConfig(estimator=velora_fx.{cls.__name__}({spelled})). The old one is removed in 0.4.",
            DeprecationWarning,
            stacklevel=3,
        )
    return cls(**mine)
