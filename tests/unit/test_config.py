"""TransformerConfig: derived defaults, validation and JSON round-trip."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
import pytest

from mitk import TransformerConfig
from mitk.errors import ConfigError

BASE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_vocab": 100, "n_ctx": 32}


def test_derived_defaults() -> None:
    cfg = TransformerConfig(**BASE)
    assert (cfg.d_head, cfg.d_mlp, cfg.n_key_value_heads, cfg.rotary_dim) == (16, 256, 4, 16)
    assert cfg.attn_scale == pytest.approx(16**-0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 0}, "d_model must be a positive int"),
        ({"n_layers": -1}, "n_layers"),
        ({"n_heads": 2.5}, "n_heads"),
        ({"n_key_value_heads": 3}, "multiple of n_key_value_heads"),
        ({"act_fn": "swishy"}, "act_fn must be one of"),
        ({"positional": "relative"}, "positional must be one of"),
        ({"attention_backend": "flash"}, "attention_backend must be one of"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"positional": "rotary", "rotary_dim": 7}, "rotary_dim must be even"),
        ({"d_mlp": -3}, "d_mlp"),
        ({"rotary_style": "llama"}, "rotary_style must be one of"),
        ({"sliding_window": -1}, "sliding_window must be >= 0"),
        ({"sliding_window": 4, "sliding_window_layers": [5]}, "sliding_window_layers must lie"),
    ],
)
def test_invalid_fields_are_named(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**{**BASE, **change})


def test_config_is_frozen() -> None:
    cfg = TransformerConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.d_model = 3  # type: ignore[misc]


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match="unknown TransformerConfig field"):
        TransformerConfig.from_dict({**BASE, "n_embd": 3})
    with pytest.raises(ConfigError, match="missing TransformerConfig field"):
        TransformerConfig.from_dict({"d_model": 4})
    with pytest.raises(ConfigError, match="not valid JSON"):
        TransformerConfig.from_json("{nope")


@given(
    n_heads=st.sampled_from([1, 2, 4, 8]),
    kv_div=st.sampled_from([1, 2]),
    d_head=st.integers(1, 32),
    d_mlp=st.integers(0, 128),
    act_fn=st.sampled_from(["gelu", "gelu_tanh", "relu", "silu"]),
    normalization=st.sampled_from(["layernorm", "rmsnorm"]),
    gated=st.booleans(),
    parallel=st.booleans(),
)
def test_json_round_trip(
    n_heads: int,
    kv_div: int,
    d_head: int,
    d_mlp: int,
    act_fn: str,
    normalization: str,
    gated: bool,
    parallel: bool,
) -> None:
    cfg = TransformerConfig(
        **{**BASE, "n_heads": n_heads},
        n_key_value_heads=max(1, n_heads // kv_div),
        d_head=d_head,
        d_mlp=d_mlp,
        act_fn=act_fn,  # type: ignore[arg-type]
        normalization=normalization,  # type: ignore[arg-type]
        gated_mlp=gated,
        parallel_attn_mlp=parallel,
        extra={"source": "test"},
    )
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert cfg.replace(n_layers=5).n_layers == 5


ROTARY = {**BASE, "positional": "rotary"}
SCALING = {"kind": "yarn", "factor": 4.0, "original_context": 8, "attention_factor": 1.1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "ntk"}, "kind must be one of"),
        ({"factor": 0.0}, "factor must be a positive number"),
        ({"beta_fast": True}, "beta_fast must be a positive number"),
        ({"original_context": 0}, "original_context must be a positive int"),
        ({"kind": "llama3", "attention_factor": 1.0, "low_freq_factor": 4.0},
         "high_freq_factor .* > low_freq_factor"),
        ({"kind": "linear"}, "attention_factor applies to yarn and longrope scaling only"),
    ],
)  # fmt: skip
def test_invalid_rotary_scaling_is_named(change: dict, message: str) -> None:
    from mitk.config import RotaryScaling

    with pytest.raises(ConfigError, match=message):
        RotaryScaling(**{**SCALING, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positional": "learned", "rotary_scaling": SCALING}, "rotary_scaling needs positional"),
        ({"rotary_scaling": {**SCALING, "spin": 1}}, "unknown RotaryScaling field"),
        ({"qk_norm": "global"}, "qk_norm must be one of"),
        ({"pre_norms": False}, "pre_norms=False needs sandwich_norms"),
        ({"rotary_local_layers": [2]}, r"rotary_local_layers needs .* in \[0, 2\)"),
        ({"no_rotary_layers": [-1]}, "no_rotary_layers needs"),
        ({"positional": "learned", "no_rotary_layers": [0]}, "no_rotary_layers needs positional"),
        ({"rotary_local_base": 0.0}, "rotary_local_base must be positive"),
    ],
)
def test_invalid_variant_fields_are_named(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransformerConfig.from_dict({**ROTARY, **change})


def test_rotary_scaling_and_norm_variants_round_trip_through_json() -> None:
    cfg = TransformerConfig.from_dict(
        {**ROTARY, "rotary_scaling": SCALING, "qk_norm": "projection", "pre_norms": False,
         "sandwich_norms": True, "normalization": "rmsnorm"}
    )  # fmt: skip
    assert cfg.rotary_scaling is not None and cfg.rotary_scaling.factor == 4.0
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert cfg.replace(n_layers=3).rotary_scaling == cfg.rotary_scaling
    assert cfg.replace(rotary_scaling=None).rotary_scaling is None


def test_per_layer_rotary_round_trips_and_picks_each_layers_ladder() -> None:
    cfg = TransformerConfig.from_dict(
        {**ROTARY, "n_layers": 4, "rotary_scaling": {"kind": "linear", "factor": 8.0},
         "rotary_local_layers": [0, 2], "rotary_local_base": 100.0, "no_rotary_layers": [3]}
    )  # fmt: skip
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    ladders = [cfg.rotary_of(layer) for layer in range(4)]
    assert ladders == [(100.0, None), (10000.0, cfg.rotary_scaling), (100.0, None), None]
    assert TransformerConfig(**BASE).rotary_of(0) is None  # learned positions rotate nothing
