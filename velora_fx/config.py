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
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from .settings import (
    ESTIMATORS,
    INIT_MODES,
    EstimatorSettings,
    Principal,
    PrincipalRandom,
    Quantized,
    RandomProjection,
    Velora,
)

__all__ = ["VeloraConfig", "EstimatorSettings", "Velora", "RandomProjection", "Principal", "PrincipalRandom",
           "Quantized", "INIT_MODES", "ESTIMATORS"]  # fmt: skip

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
        overrides: per-weight sizes: ``{pattern: settings}``, glob patterns
            on parameter names as in ``include``, each mapped to settings of
            the same estimator that differ from ``estimator`` only in how an
            input is kept (``EstimatorSettings.SITE_FIELDS``: ``bits``,
            ``group_size``, ``rounding`` and ``rotation`` of ``Quantized``,
            ``num_groups`` / ``sub_token_size`` of ``Velora``, ``rank`` of the
            single projections). The first
            matching pattern wins; other weights use ``estimator``. Weights
            that read one input and resolve to different sizes keep one record
            each.
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
        >>> cfg = VeloraConfig(estimator=Quantized(bits=2, group_size=128),
        ...                    overrides={"*.down_proj.weight": Quantized(bits=1, group_size=128)})
        >>> cfg.estimator_for("layers.0.mlp.down_proj.weight").bits, cfg.estimator_for("lm_head.weight").bits
        (1, 2)
    """

    estimator: EstimatorSettings
    seed: int
    scale: float
    min_saved_bytes: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    memory_budget: Optional[float]
    overrides: tuple[tuple[str, EstimatorSettings], ...]

    def __init__(self, estimator: Union[EstimatorSettings, str, dict, None] = None, *, seed: int = 0,
                 scale: float = 1.0, min_saved_bytes: int = 0, include: Any = ("*",), exclude: Any = (),
                 memory_budget: Optional[float] = None, overrides: Any = (), **legacy: Any):  # fmt: skip
        unknown = set(legacy) - set(_LEGACY)
        if unknown:
            raise TypeError(f"VeloraConfig got unexpected keyword arguments {sorted(unknown)}")
        settings = _estimator_settings(estimator, legacy)
        fields = {"estimator": settings, "seed": seed, "scale": scale, "min_saved_bytes": min_saved_bytes,
                  "include": _as_patterns(include, "include"), "exclude": _as_patterns(exclude, "exclude"),
                  "memory_budget": memory_budget, "overrides": _overrides(overrides, settings)}  # fmt: skip
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

    def estimator_for(self, param_name: str) -> EstimatorSettings:
        """The estimator's settings for the weight named ``param_name``: the first matching override's, else
        ``estimator``."""
        for pattern, settings in self.overrides:
            if fnmatch.fnmatchcase(param_name, pattern):
                return settings
        return self.estimator

    def for_weight(self, param_name: str) -> "VeloraConfig":
        """This config with ``estimator_for(param_name)`` as its estimator and no overrides: what one site's codec
        is built from (``estimators.for_config``)."""
        return self if not self.overrides else _for_weight(self, param_name)

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
                "exclude": list(self.exclude), "memory_budget": self.memory_budget,
                **({"overrides": {p: e.to_dict() for p, e in self.overrides}} if self.overrides else {})}  # fmt: skip

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


@functools.lru_cache(maxsize=1024)
def _for_weight(config: VeloraConfig, param_name: str) -> VeloraConfig:
    """``config.for_weight(param_name)``, built once (the FX route asks on every call of a site)."""
    return dataclasses.replace(config, estimator=config.estimator_for(param_name), overrides=())


def _overrides(value: Any, base: EstimatorSettings) -> tuple[tuple[str, EstimatorSettings], ...]:
    """``VeloraConfig.overrides`` as ``((pattern, settings), ...)``, from a dict (or pairs) of patterns to settings
    (or their ``to_dict()``), each checked against ``base``: same estimator, differing in ``SITE_FIELDS`` only."""
    pairs = value.items() if isinstance(value, dict) else value
    try:
        pairs = [tuple(pair) for pair in pairs]
    except TypeError:
        raise ValueError(f"VeloraConfig.overrides must be a dict of glob patterns to estimator settings, got {value!r}") from None
    out = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"VeloraConfig.overrides must map glob patterns (str) to estimator settings, got {pair!r}")
        pattern, settings = pair[0], _estimator_settings(pair[1], {}) if isinstance(pair[1], dict) else pair[1]
        if not isinstance(settings, EstimatorSettings):
            raise ValueError(f"VeloraConfig.overrides[{pattern!r}] must be estimator settings such as "
                             f"{type(base).__name__}(...), got {settings!r}")  # fmt: skip
        if type(settings) is not type(base):
            raise ValueError(
                f"VeloraConfig.overrides[{pattern!r}] is {type(settings).__name__}, but the estimator is "
                f"{type(base).__name__}: an override changes how much a weight's input keeps, not the estimator; "
                f"give {type(base).__name__}(...) with other {_site_fields(base)}, or exclude the weight"
            )
        same = dataclasses.replace(settings, **{f: getattr(base, f) for f in type(base).SITE_FIELDS})
        differ = [f.name for f in dataclasses.fields(base) if getattr(same, f.name) != getattr(base, f.name)]
        if differ:
            raise ValueError(
                f"VeloraConfig.overrides[{pattern!r}] changes {differ}, which must be the same for every weight; an "
                f"override may change only {_site_fields(base)} (the rest is the estimator's: set it there)"
            )
        out.append((pattern, settings))
    return tuple(out)


def _site_fields(settings: EstimatorSettings) -> str:
    fields = type(settings).SITE_FIELDS
    return " / ".join(fields) if fields else f"nothing ({type(settings).__name__} has no per-weight sizes)"


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
    if isinstance(estimator, EstimatorSettings):
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
        if legacy.get("rank") is None:
            legacy["rank"] = legacy["num_groups"]
        legacy.pop("num_groups")
    foreign = {k: v for k, v in legacy.items() if k not in own and v != _LEGACY_DEFAULTS[k]}  # 0.2 ignored defaults
    if foreign:
        k = next(iter(foreign))
        raise ValueError(f"VeloraConfig: {k} is a field of {_owners(k)}, not of {cls.__name__} (estimator={name!r})")
    mine = {k: v for k, v in legacy.items() if k in own and v is not None}  # None: 0.2's "the default"
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
