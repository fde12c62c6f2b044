"""Per-query-head keys and values from a grouped-query cache, expanded on demand."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.cache import expand_kv_heads
from mitk.model.attention import Attention


@pytest.fixture(scope="module", params=["learned", "rotary"])
def gqa(request: pytest.FixtureRequest) -> HookedTransformer:
    """4 query heads over 2 key-value heads (group 2), learned or rotary positions."""
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_key_value_heads=2, d_vocab=40,
                            n_ctx=16, positional=request.param)  # fmt: skip
    return HookedTransformer(cfg, seed=3)


def test_expansion_gives_query_head_h_key_value_head_h_over_group() -> None:
    kv = torch.randn(2, 5, 3, 8)  # [batch, pos, kv_head, d_head]
    wide = expand_kv_heads(kv, 6)
    assert wide.shape == (2, 5, 6, 8)
    for h in range(6):
        assert torch.equal(wide[:, :, h], kv[:, :, h // 2])
    assert expand_kv_heads(kv, 3) is kv  # nothing to expand
    # what attention's explicit path does in its [batch, head, pos, d] layout
    expected = kv.transpose(1, 2).repeat_interleave(2, dim=1)
    assert torch.equal(wide.transpose(1, 2), expected)
    with pytest.raises(ValueError, match="multiple"):
        expand_kv_heads(kv, 4)


def test_cache_keeps_kv_heads_and_expands_per_query_head(gqa: HookedTransformer) -> None:
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = gqa.run_with_cache(tokens)
    assert cache["k", 0].shape == (2, 7, 2, gqa.cfg.d_head)
    for kind in ("k", "v"):
        wide = cache.per_query_head((kind, 1))
        assert wide.shape == (2, 7, 4, gqa.cfg.d_head)
        assert torch.equal(wide[:, :, 3], cache[kind, 1][:, :, 1])
    with pytest.raises(ValueError, match="expands k, rot_k or v"):
        cache.per_query_head(("q", 0))
    # without the batch axis the heads axis is still second to last
    single = gqa.run_with_cache(tokens[:1])[1].remove_batch_dim()
    assert single.per_query_head(("v", 0)).shape == (7, 4, gqa.cfg.d_head)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_scores_recomputed_from_cached_queries_and_expanded_keys(
    gqa: HookedTransformer, padded: bool
) -> None:
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :3] = 0
    _, cache = gqa.run_with_cache(tokens, attention_mask=mask)
    rotary = gqa.cfg.positional == "rotary"
    q_kind, k_kind = ("rot_q", "rot_k") if rotary else ("q", "k")
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    visible = causal & mask.bool()[:, None, None, :]  # [batch, 1, query, key]
    for layer in range(gqa.cfg.n_layers):
        assert isinstance(gqa.blocks[layer].attn, Attention)
        assert gqa.attention_paths()[layer].startswith("eager")
        q = cache[q_kind, layer]
        k = cache.per_query_head((k_kind, layer))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * gqa.cfg.attn_scale
        hooked = cache["attn_scores", layer]
        torch.testing.assert_close(scores.masked_fill(~visible, 0), hooked.masked_fill(~visible, 0))
