"""``TransformerConfig.longformer``: validated, JSON round-trips, and builds a native model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.config import LongformerConfig, TransformerConfig
from mitk.errors import ConfigError


def _cfg(**changes: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "d_model": 16, "n_layers": 2, "n_heads": 2, "d_vocab": 20, "n_ctx": 40, "d_mlp": 32,
        "causal": False, "longformer": LongformerConfig([4, 2]),
    }  # fmt: skip
    return TransformerConfig(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"longformer": LongformerConfig([4])}, "one width per layer"),
        ({"causal": True}, "causal=True"),
        ({"positional": "rotary"}, "positional='rotary'"),
        ({"n_key_value_heads": 1}, "grouped-query"),
        ({"sliding_window": 3}, "sliding_window"),
    ],
)
def test_refused_combinations_are_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**changes)


@pytest.mark.parametrize("windows", [[3, 4], [0, 2], [True, 2], 4])
def test_windows_must_be_a_list_of_positive_even_ints(windows: object) -> None:
    with pytest.raises(ConfigError, match="positive even ints"):
        LongformerConfig(windows)  # type: ignore[arg-type]


def test_native_model_round_trips_and_runs_banded(tmp_path: Path) -> None:
    cfg = _cfg()
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    model = HookedTransformer(cfg, seed=0).eval()
    assert model.blocks[0].attn.W_Q_global.abs().sum() > 0  # initialised like W_Q
    tokens = torch.randint(0, 20, (2, 13), generator=torch.Generator().manual_seed(0))
    glob = torch.zeros_like(tokens)
    glob[:, 6] = 1
    with torch.no_grad():
        fused = model(tokens, global_attention_mask=glob)
        assert model.attention_paths() == [
            "sdpa: banded, window 4 + global tokens",
            "sdpa: banded, window 2 + global tokens",
        ]
        with model.backend("eager"):
            eager = model(tokens, global_attention_mask=glob)
        again = HookedTransformer.from_pretrained(model.save(tmp_path / "native"))
        loaded = again(tokens, global_attention_mask=glob)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded, fused, atol=0, rtol=0)
