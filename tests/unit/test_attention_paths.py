"""The fused-attention rule: SDPA unless a hook on that layer needs scores or patterns."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import HookError

SDPA_OP = "aten::scaled_dot_product_attention"
SOFTMAX_OP = "aten::softmax"


def op_counts(fn) -> Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter({e.key: e.count for e in prof.key_averages()})


@pytest.fixture
def model() -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=3, n_heads=4, d_vocab=50, n_ctx=16)
    return HookedTransformer(cfg, seed=3)


def test_no_hooks_runs_fused_in_every_layer(model: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 8))
    ops = op_counts(lambda: model(tokens))
    assert ops[SDPA_OP] == 3 and ops[SOFTMAX_OP] == 0
    assert model.attention_paths() == ["sdpa"] * 3


def test_q_k_v_z_hooks_keep_the_fused_path(model: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 8))
    names = lambda n: n.split(".")[-1] in {"hook_q", "hook_k", "hook_v", "hook_z"}  # noqa: E731
    ops = op_counts(lambda: model.run_with_cache(tokens, names_filter=names))
    assert ops[SDPA_OP] == 3 and ops[SOFTMAX_OP] == 0


@pytest.mark.parametrize("hook", ["hook_pattern", "hook_attn_scores"])
def test_only_the_hooked_layer_runs_explicitly(model: HookedTransformer, hook: str) -> None:
    tokens = torch.randint(0, 50, (2, 8))
    ops = op_counts(lambda: model.run_with_cache(tokens, names_filter=f"blocks.1.attn.{hook}"))
    assert ops[SDPA_OP] == 2 and ops[SOFTMAX_OP] == 1
    paths = model.attention_paths()
    assert paths[0] == paths[2] == "sdpa" and paths[1].startswith("eager: hooked blocks.1.attn")


def test_backend_override(model: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 8))
    with model.backend("eager"):
        ops = op_counts(lambda: model(tokens))
    assert ops[SDPA_OP] == 0 and ops[SOFTMAX_OP] == 3
    assert model.attention_backend == "auto"
    with (
        model.backend("sdpa"),
        pytest.raises(HookError, match=r"cannot fire blocks\.0\.attn\.hook_pattern"),
    ):
        # the fused kernel computes no pattern: a hook on it must fail, not be skipped
        model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    assert not any(p.has_hooks for p in model.hook_dict.values())


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_both_paths_agree(model: HookedTransformer, padding: str | None) -> None:
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = None
    if padding:
        mask = torch.ones_like(tokens)
        if padding == "left":
            mask[0, :4] = 0
        else:
            mask[0, 6:] = 0
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        with model.backend("eager"):
            explicit = model(tokens, attention_mask=mask)
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=0)


def test_grouped_query_attention_paths_agree() -> None:
    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, n_key_value_heads=2, d_vocab=50, n_ctx=16
    )
    model = HookedTransformer(cfg, seed=4)
    tokens = torch.randint(0, 50, (2, 9))
    _, cache = model.run_with_cache(
        tokens, names_filter=["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"]
    )
    assert cache["blocks.0.attn.hook_k"].shape == (2, 9, 2, 8)
    assert cache["blocks.0.attn.hook_q"].shape == (2, 9, 4, 8)
    with torch.no_grad():
        fused = model(tokens)
        with model.backend("eager"):
            explicit = model(tokens)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


def test_bidirectional_attention_sees_the_future() -> None:
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, causal=False)
    model = HookedTransformer(cfg, seed=5)
    tokens = torch.randint(0, 50, (1, 6))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
        with model.backend("eager"):
            c = model(tokens)
    assert not torch.allclose(a[0, 0], b[0, 0])  # position 0 depends on the last token
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
