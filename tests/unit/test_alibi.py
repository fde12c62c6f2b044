"""ALiBi, sinusoidal positions and sliding windows: formulas, hooks and the fused path."""

from __future__ import annotations

import math

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.model.alibi import alibi_bias, alibi_slopes
from tests.unit.test_attention_paths import SDPA_OP, SOFTMAX_OP, op_counts


def _model(**kw: object) -> HookedTransformer:
    base: dict[str, object] = {
        "d_model": 48,
        "n_layers": 2,
        "n_heads": 6,
        "d_vocab": 40,
        "n_ctx": 16,
    }
    return HookedTransformer(TransformerConfig(**{**base, **kw}), seed=11)  # type: ignore[arg-type]


def test_slopes_follow_the_paper() -> None:
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4-head ladder (2^-2, 2^-4, ...) then every other slope of the 8-head one
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected))


def test_bias_is_slope_times_signed_distance() -> None:
    bias = alibi_bias(torch.tensor([0.5, 0.25]), torch.tensor([[2, 3]]), torch.arange(4)[None])
    assert bias.shape == (1, 2, 2, 4)
    torch.testing.assert_close(bias[0, 0, 1], torch.tensor([-1.5, -1.0, -0.5, 0.0]))
    torch.testing.assert_close(bias[0, 1, 0], torch.tensor([-0.5, -0.25, 0.0, 0.25]))


def test_attn_scores_include_the_bias() -> None:
    model = _model(positional="alibi")
    tokens = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_attn_scores"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    plain = torch.einsum("bqhd,bkhd->bhqk", q, k) * model.cfg.attn_scale
    scores = cache["blocks.0.attn.hook_attn_scores"]
    slope = alibi_slopes(6)[2]
    torch.testing.assert_close((scores - plain)[0, 2, 4, :5], slope * torch.arange(-4.0, 1.0))
    assert torch.isinf(scores[0, :, 0, 1:]).all()  # still causal


@pytest.mark.parametrize(
    "kw",
    [{"positional": "alibi"}, {"positional": "rotary", "sliding_window": 3},
     {"positional": "alibi", "sliding_window": 4}],
    ids=["alibi", "rotary-window", "alibi-window"],
)  # fmt: skip
def test_bias_and_window_run_fused_and_agree_with_the_explicit_path(kw: dict) -> None:
    model = _model(**kw)
    tokens = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[1, 7:] = 0
    with torch.no_grad():
        ops = op_counts(lambda: model(tokens, attention_mask=mask))
        fused = model(tokens, attention_mask=mask)
        with model.backend("eager"):
            explicit = model(tokens, attention_mask=mask)
    assert ops[SDPA_OP] == 2 and ops[SOFTMAX_OP] == 0
    real = mask.bool()
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=0)


def test_alibi_left_padding_gives_each_row_its_unpadded_outputs() -> None:
    model = _model(positional="alibi")
    tokens = torch.randint(1, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad():
        batch, alone = model(tokens, attention_mask=mask), model(tokens[:1, 3:])
    torch.testing.assert_close(batch[0, 3:], alone[0], atol=1e-5, rtol=0)


def test_sliding_window_hides_keys_window_or_more_back() -> None:
    model = _model(positional="rotary", sliding_window=3, sliding_window_layers=[1])
    tokens = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(3))
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    windowed = cache["blocks.1.attn.hook_pattern"][0]
    q, k = torch.arange(7)[:, None], torch.arange(7)[None]
    assert (windowed[:, (q - k >= 3) | (k > q)] == 0).all()
    assert (windowed[:, (q - k < 3) & (k <= q)] > 0).all()
    assert (cache["blocks.0.attn.hook_pattern"][0, :, 6, :4] > 0).all()  # layer 0 has no window


def test_sinusoidal_positions_match_the_formula_and_are_hooked() -> None:
    model = _model(positional="sinusoidal", d_model=8, n_heads=2)
    tokens = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # left padding: row 1's first real token is position 0
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter="hook_pos_embed")
    expected = torch.empty(5, 8)
    for p in range(5):
        for i in range(4):
            expected[p, 2 * i] = math.sin(p / 10000 ** (2 * i / 8))
            expected[p, 2 * i + 1] = math.cos(p / 10000 ** (2 * i / 8))
    pos_embed = cache["hook_pos_embed"]
    torch.testing.assert_close(pos_embed[0], expected)
    torch.testing.assert_close(pos_embed[1, 2:], expected[:3])
    assert not any(p.shape == (16, 8) for p in model.parameters())  # nothing learned
    again = _model(positional="sinusoidal", d_model=8, n_heads=2)
    _, cache_again = again.run_with_cache(
        tokens, attention_mask=mask, names_filter="hook_pos_embed"
    )
    torch.testing.assert_close(cache_again["hook_pos_embed"], pos_embed, atol=0, rtol=0)
