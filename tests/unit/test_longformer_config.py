"""``TransformerConfig.longformer``: validated, JSON round-trips, native models run and analyse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.config import LongformerConfig, TransformerConfig
from mitk.errors import ConfigError, UnsupportedModelError


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


def _pre_norm_model() -> HookedTransformer:
    """A native pre-norm Longformer whose norms and biases are not the identity."""
    model = HookedTransformer(_cfg(), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".w", ".b")) or ".b_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def test_processing_refuses_steps_that_miss_the_global_projections() -> None:
    """fold_ln, fold_value_biases and the QK refactor rewrite W_qkv only: refused by name."""
    model = _pre_norm_model()
    tokens = torch.randint(0, 20, (2, 13), generator=torch.Generator().manual_seed(0))
    glob = torch.zeros_like(tokens)
    glob[:, 6] = 1
    with torch.no_grad():
        before = model(tokens, global_attention_mask=glob).log_softmax(-1)
    for step in ("fold_ln", "fold_value_biases", "refactor_factored_attn_matrices"):
        with pytest.raises(UnsupportedModelError, match=f"{step}.*W_qkv_global"):
            model.process_weights(**{step: True})
    model.process_weights(center_writing_weights=True, center_unembed=True)
    with torch.no_grad():
        after = model(tokens, global_attention_mask=glob).log_softmax(-1)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_dla_of_a_pre_norm_longformer_sums_to_the_logit(by: str) -> None:
    """Global rows are part of each head's z, so per-head writes still add up."""
    model = _pre_norm_model()
    tokens = torch.randint(0, 20, (2, 13), generator=torch.Generator().manual_seed(0))
    glob = torch.zeros_like(tokens)
    glob[:, [0, 12]] = 1  # the last position, which DLA reads, is a global token
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, global_attention_mask=glob)
    answers, wrong = torch.tensor([1, 5]), torch.tensor([2, 6])
    result = logit_attribution(model, cache, answers, wrong, by=by)
    expected = logits[:, -1].gather(1, answers[:, None])[:, 0]
    expected = expected - logits[:, -1].gather(1, wrong[:, None])[:, 0]
    torch.testing.assert_close(result.total(), expected, atol=1e-4, rtol=0)


def test_generation_refuses_the_cache_and_reruns_without_it() -> None:
    """A bidirectional layer's keys change with every new token: no stale cache is kept."""
    model = HookedTransformer(_cfg(), seed=0).eval()
    tokens = torch.randint(0, 20, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = {"max_new_tokens": 2, "verbose": False, "stop_at_eos": False, "do_sample": False}
    with pytest.raises(UnsupportedModelError, match="no key-value cache"):
        model.generate(tokens, **greedy)
    out = model.generate(tokens, use_past_kv_cache=False, **greedy)
    with torch.no_grad():
        first = model(tokens)[0, -1].argmax()
    assert out.shape == (1, 7) and out[0, 5] == first
