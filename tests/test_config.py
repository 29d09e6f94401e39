import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from velora_fx import INIT_MODES, Quantized, VeloraConfig


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
    num_groups=st.one_of(st.none(), st.integers(1, 512)),
    init=st.sampled_from(INIT_MODES),
    ema_decay=st.floats(0, 0.999),
    seed=st.integers(0, 2**31),
    scale=st.floats(1e-6, 10),
    min_saved_bytes=st.integers(0, 2**40),
    include=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3).map(tuple),
    exclude=st.lists(st.text(max_size=8), max_size=3).map(tuple),
) | st.builds(VeloraConfig, sub_token_size=st.integers(1, 512)) | st.builds(
    VeloraConfig,
    estimator=st.builds(Quantized, bits=st.sampled_from([1, 2, 3, 4, 8]), group_size=st.integers(1, 32).map(lambda k: 8 * k),
                        rounding=st.sampled_from(["stochastic", "nearest"])),
    seed=st.integers(0, 2**31),
)


@given(configs)
def test_round_trips_through_a_json_dict(cfg):
    assert VeloraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys \\['groups'\\]"):
        VeloraConfig.from_dict({"groups": 4})
