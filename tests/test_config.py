import json
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from velora_fx import INIT_MODES, Principal, PrincipalRandom, Quantized, RandomProjection, Velora, VeloraConfig


def test_defaults_are_the_papers():
    cfg = VeloraConfig()
    assert (cfg.num_groups, cfg.sub_token_size, cfg.init, cfg.scale) == (32, None, "batch_average_once", 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_groups": 8, "sub_token_size": 4}, "not both"),
        ({"num_groups": 0}, "num_groups must be a positive int"),
        ({"num_groups": 2.5}, "num_groups must be a positive int"),
        ({"num_groups": True}, "num_groups must be a positive int"),
        ({"sub_token_size": -1}, "sub_token_size must be a positive int"),
        ({"init": "pca"}, "init must be one of"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"scale": float("nan")}, "scale must be a positive finite number"),
        ({"scale": 0.0}, "scale must be a positive finite number.*exclude it"),
        ({"scale": -1.0}, "scale must be a positive finite number.*reverse its updates"),
        ({"min_saved_bytes": -5}, "min_saved_bytes must be an int >= 0"),
        ({"include": [1]}, "include must hold glob patterns"),
        ({"exclude": 3}, "exclude must be a string or a sequence"),
        ({"seed": "x"}, "seed must be an int"),
    ],
)
def test_invalid_values_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VeloraConfig(**kwargs)


def test_frozen_and_patterns_normalised():
    cfg = VeloraConfig(include="*.v_proj.weight", exclude=["lm_head.*"])
    assert cfg.include == ("*.v_proj.weight",) and cfg.exclude == ("lm_head.*",)
    with pytest.raises(AttributeError):
        cfg.scale = 2.0  # type: ignore[misc]
    hash(cfg)


@pytest.mark.parametrize(
    "cfg, features, d",
    [
        (VeloraConfig(num_groups=32), 4096, 128),
        (VeloraConfig(num_groups=32), 100, 4),  # ceil(100 / 32) = 4: 25 sub-tokens, none padded
        (VeloraConfig(num_groups=6), 10, 2),
        (VeloraConfig(num_groups=4), 10, 3),  # 4 sub-tokens of 3, the last one zero-padded
        (VeloraConfig(sub_token_size=16), 40, 16),  # 3 sub-tokens, the last padded by 8
        (VeloraConfig(num_groups=32), 31, None),
        (VeloraConfig(sub_token_size=64), 63, None),
    ],
)
def test_sub_token_size_for(cfg, features, d):
    assert cfg.sub_token_size_for(features) == d
    assert (cfg.why_not_splittable(features) is None) == (d is not None and d > 1)


def test_patterns():
    cfg = VeloraConfig(include=("*.v_proj.weight", "*.down_proj.weight"), exclude=("layers.0.*",))
    assert cfg.why_excluded("layers.1.self_attn.v_proj.weight") is None
    assert cfg.why_excluded("layers.1.mlp.down_proj.weight") is None
    assert "include" in cfg.why_excluded("layers.1.self_attn.q_proj.weight")
    assert cfg.why_excluded("layers.0.mlp.down_proj.weight") == "excluded by pattern 'layers.0.*'"


configs = st.builds(
    VeloraConfig,
    estimator=st.builds(Velora, num_groups=st.one_of(st.none(), st.integers(1, 512)), init=st.sampled_from(INIT_MODES),
                        ema_decay=st.floats(0, 0.999)),
    seed=st.integers(0, 2**31),
    scale=st.floats(1e-6, 10),
    min_saved_bytes=st.integers(0, 2**40),
    include=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3).map(tuple),
    exclude=st.lists(st.text(max_size=8), max_size=3).map(tuple),
) | st.builds(VeloraConfig, estimator=st.builds(Velora, sub_token_size=st.integers(1, 512))) | st.builds(
    VeloraConfig,
    estimator=st.one_of(
        st.builds(RandomProjection, rank=st.integers(1, 64), refresh_every=st.integers(0, 100)),
        st.builds(Principal, rank=st.integers(1, 64), refresh_decay=st.floats(0, 0.99)),
        st.builds(PrincipalRandom, rank=st.integers(2, 64)),
    ),
    memory_budget=st.one_of(st.none(), st.floats(0.01, 1.0)),
) | st.builds(
    VeloraConfig,
    estimator=st.builds(Quantized, bits=st.sampled_from([1, 2, 3, 4, 8]), group_size=st.integers(1, 32).map(lambda k: 8 * k),
                        rounding=st.sampled_from(["stochastic", "nearest"])),
    seed=st.integers(0, 2**31),
) | st.builds(
    VeloraConfig,
    estimator=st.just(Quantized(bits=2)),
    overrides=st.dictionaries(st.text(min_size=1, max_size=8), st.builds(
        Quantized, bits=st.sampled_from([1, 2, 3, 4, 8]), group_size=st.integers(1, 32).map(lambda k: 8 * k),
        rounding=st.sampled_from(["stochastic", "nearest"])), max_size=3),
)  # fmt: skip


@given(configs)
def test_round_trips_through_a_json_dict(cfg):
    assert VeloraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides_give_a_weight_its_own_sizes_and_nothing_else():
    cfg = VeloraConfig(estimator=Velora(num_groups=16, init="ema"), include=("*",),
                       overrides={"*.down_proj.weight": Velora(num_groups=64, init="ema"), "*_proj.weight": Velora(sub_token_size=8, init="ema")})  # fmt: skip
    assert cfg.estimator_for("layers.3.mlp.down_proj.weight").num_groups == 64  # the first matching pattern wins
    assert cfg.estimator_for("layers.3.mlp.up_proj.weight").sub_token_size == 8
    assert cfg.estimator_for("lm_head.weight") is cfg.estimator
    assert cfg.for_weight("x.down_proj.weight") == VeloraConfig(estimator=Velora(num_groups=64, init="ema"))
    assert VeloraConfig().for_weight("anything") == VeloraConfig()
    assert "overrides" not in VeloraConfig().to_dict()  # a stored config of 0.3 reads back the same


@pytest.mark.parametrize(
    "estimator, overrides, message",
    [
        (Quantized(), {"a": Velora()}, r"overrides\['a'\] is Velora, but the estimator is Quantized.*bits / group_size"),
        (Velora(), {"a": Velora(init="random")}, r"changes \['init'\]"),
        (RandomProjection(rank=8), {"a": RandomProjection(rank=4, refresh_every=10)}, r"changes \['refresh_every'\]"),
        (PrincipalRandom(rank=8), {"a": PrincipalRandom(rank=16)}, "PrincipalRandom has no per-weight sizes"),
        (Quantized(), {"a": 2}, r"must be estimator settings such as Quantized\(...\), got 2"),
        (Quantized(), [("a",)], "must map glob patterns"),
        (Quantized(), 5, "must be a dict of glob patterns"),
        (Quantized(), {"a": {"name": "nope"}}, "as a dict must be the to_dict"),
    ],
)
def test_an_override_that_changes_more_than_sizes_is_an_error(estimator, overrides, message):
    with pytest.raises(ValueError, match=message):
        VeloraConfig(estimator=estimator, overrides=overrides)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys \\['groups'\\]"):
        VeloraConfig.from_dict({"groups": 4})


# -- the config by estimator (0.3), and the flat spelling of 0.2 -------------------------------------------------


def test_new_spellings_warn_nothing_and_default_to_the_paper():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = VeloraConfig()
        assert cfg.estimator == Velora() == Velora(num_groups=32) and cfg.estimator_name == "velora"
        VeloraConfig(estimator=Quantized(bits=3), scale=0.5, exclude=("lm_head.weight",), memory_budget=0.5)
        VeloraConfig(estimator=PrincipalRandom(rank=8), seed=3)


@pytest.mark.parametrize(
    "old, new, spelled",
    [
        ({"num_groups": 16}, Velora(num_groups=16), r"estimator=velora_fx\.Velora\(num_groups=16\)"),
        ({"sub_token_size": 8, "init": "ema"}, Velora(sub_token_size=8, init="ema"), r"Velora\(sub_token_size=8, init='ema'\)"),
        ({"estimator": "random", "rank": 8, "refresh_every": 2}, RandomProjection(rank=8, refresh_every=2),
         r"RandomProjection\(rank=8, refresh_every=2\)"),
        ({"estimator": "principal", "num_groups": 16}, Principal(rank=16), r"Principal\(rank=16\)"),  # rank from num_groups
        ({"estimator": "principal_random", "rank": 8, "random_rank": 2}, PrincipalRandom(rank=8, random_rank=2),
         r"PrincipalRandom\(rank=8, random_rank=2\)"),
    ],
)
def test_the_flat_spelling_of_0_2_works_and_says_the_new_one(old, new, spelled):
    with pytest.warns(DeprecationWarning, match=spelled + r".*removed in 0\.4"):
        cfg = VeloraConfig(**old, scale=0.5)
    assert cfg == VeloraConfig(estimator=new, scale=0.5)
    assert all(getattr(cfg, k) == v for k, v in old.items() if k in new.__dataclass_fields__)  # read back


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"estimator": Quantized(), "num_groups": 4}, r"num_groups is a field of Velora, not of VeloraConfig; this "
                                                       r"config's estimator=Quantized\(...\) has no num_groups"),
        ({"estimator": Velora(), "num_groups": 4}, r"give it to the estimator: Velora\(num_groups=4\)"),
        ({"estimator": Velora(), "rank": 4}, r"rank is a field of RandomProjection and Principal and PrincipalRandom"),
        ({"estimator": "random", "init": "ema"}, r"init is a field of Velora, not of RandomProjection"),
        ({"estimator": "quantized"}, "must be Velora"),
        ({"estimator": "pca"}, "must be Velora"),
    ],
)
def test_a_field_given_to_the_wrong_place_is_an_error(kwargs, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=message):
            VeloraConfig(**kwargs)


def test_each_estimator_validates_only_its_own_fields():
    with pytest.raises(TypeError):
        Velora(rank=4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="RandomProjection.rank must be a positive int"):
        RandomProjection(rank=0)
    with pytest.raises(ValueError, match=r"Principal.refresh_decay must be in \[0, 1\)"):
        Principal(refresh_decay=1.0)
    with pytest.raises(ValueError, match="both at least 1"):
        PrincipalRandom(rank=4, random_rank=4)
    with pytest.raises(ValueError, match="already refreshes v every step"):
        Velora(init="ema", refresh_every=10)


@pytest.mark.parametrize(
    "stored, new",
    [  # what 0.2's to_dict() wrote: every flat field
        ({"num_groups": 16, "sub_token_size": None, "init": "batch_average_once", "ema_decay": 0.9, "seed": 1,
          "scale": 1.0, "min_saved_bytes": 0, "include": ["*"], "exclude": [], "memory_budget": None,
          "estimator": "velora", "rank": None, "random_rank": None, "refresh_every": 0, "refresh_decay": 0.5},
         VeloraConfig(estimator=Velora(num_groups=16), seed=1)),
        ({"num_groups": 32, "sub_token_size": None, "init": "batch_average_once", "ema_decay": 0.9, "seed": 0,
          "scale": 1.0, "min_saved_bytes": 0, "include": ["*"], "exclude": [], "memory_budget": 0.5,
          "estimator": "random", "rank": 32, "random_rank": None, "refresh_every": 100, "refresh_decay": 0.5},
         VeloraConfig(estimator=RandomProjection(rank=32, refresh_every=100), memory_budget=0.5)),
        ({"num_groups": 32, "sub_token_size": None, "init": "batch_average_once", "ema_decay": 0.9, "seed": 0,
          "scale": 1.0, "min_saved_bytes": 0, "include": ["*"], "exclude": [], "memory_budget": None,
          "estimator": {"name": "quantized", "bits": 3, "group_size": 32, "rounding": "stochastic"}, "rank": None,
          "random_rank": None, "refresh_every": 0, "refresh_decay": 0.5},
         VeloraConfig(estimator=Quantized(bits=3))),
    ],
)
def test_a_stored_0_2_config_loads_without_a_warning(stored, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VeloraConfig.from_dict(stored) == new
