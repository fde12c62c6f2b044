"""Sparse Transformer masks: the definitions, the fused path, the pattern hook, generation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import ConfigError, UnsupportedModelError
from mitk.model.sparse_patterns import sparse_allowed

CFG = TransformerConfig(
    d_model=32, n_layers=2, n_heads=4, n_key_value_heads=2, d_vocab=60, n_ctx=64, d_mlp=64,
    positional="rotary", normalization="rmsnorm", sparse_attention="strided", sparse_block=4,
)  # fmt: skip


def _slow_pattern(kind: str, block: int, summary: int, n: int) -> torch.Tensor:
    """The definitions of Child et al., one cell at a time, with causality."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            if kind == "strided":
                out[i, j] = (i - j) < block or (i - j) % block == 0
            else:
                out[i, j] = i // block == j // block or j % block >= block - summary
    return out


@pytest.mark.parametrize(
    ("kind", "block", "summary"),
    [("strided", 4, 1), ("strided", 3, 1), ("fixed", 4, 1), ("fixed", 5, 2)],
)
def test_masks_match_the_definitions_and_their_suffix_rows(
    kind: str, block: int, summary: int
) -> None:
    full = sparse_allowed(kind, block, summary, 23, 23, torch.device("cpu"))  # type: ignore[arg-type]
    causal = torch.ones(23, 23, dtype=torch.bool).tril()
    assert torch.equal(full & causal, _slow_pattern(kind, block, summary, 23))
    # a pass that continues a cache asks for the last rows only
    suffix = sparse_allowed(kind, block, summary, 5, 23, torch.device("cpu"))  # type: ignore[arg-type]
    assert torch.equal(suffix, full[-5:])


def _pattern_and_logits(
    model: HookedTransformer, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    kept: list[torch.Tensor] = []
    logits = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: kept.append(p))]
    )
    return kept[0], logits


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_fused_path_equals_the_explicit_one_whose_pattern_shows_the_mask(kind: str) -> None:
    model = HookedTransformer(replace(CFG, sparse_attention=kind, sparse_summary=2), seed=0).eval()
    tokens = torch.randint(0, 60, (2, 30), generator=torch.Generator().manual_seed(0))
    fused = model(tokens)
    assert model.attention_paths() == ["sdpa", "sdpa"]  # a mask, not an explicit pass
    pattern, explicit = _pattern_and_logits(model, tokens)
    assert model.attention_paths()[1].startswith("eager")
    assert torch.allclose(fused, explicit, atol=1e-5)
    expected = _slow_pattern(kind, 4, 2, 30)
    assert torch.equal(pattern[0, 0] > 0, expected)  # zeros exactly where no attention is
    dense = HookedTransformer(replace(CFG, sparse_attention="none"), seed=0).eval()
    assert not torch.allclose(dense(tokens), fused, atol=1e-3)  # the mask changes the output


def test_generation_with_the_cache_sees_the_same_pattern() -> None:
    model = HookedTransformer(CFG, seed=0).eval()
    prompt = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(1))
    greedy = {"max_new_tokens": 12, "do_sample": False, "stop_at_eos": False}
    cached = model.generate(prompt, use_past_kv_cache=True, **greedy)
    rerun = model.generate(prompt, use_past_kv_cache=False, **greedy)
    assert torch.equal(cached, rerun)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sparse_block": 1}, "sparse_block >= 2"),
        ({"sparse_attention": "fixed", "sparse_summary": 5}, "sparse_summary"),
        ({"causal": False}, "causal=True"),
        ({"sparse_attention": "dilated"}, "sparse_attention"),
    ],
)
def test_bad_sparse_settings_are_refused(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replace(CFG, **change)


def test_export_to_transformer_lens_is_refused_by_name() -> None:
    pytest.importorskip("transformer_lens")
    with pytest.raises(UnsupportedModelError, match="sparse_attention='strided'"):
        HookedTransformer(CFG, seed=0).to_transformer_lens()
