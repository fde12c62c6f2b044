"""Direct logit attribution sums to the actual logit (difference) on every model variant."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.dla import logit_attribution
from mitk.analysis.lens import logit_lens
from mitk.errors import ShapeMismatchError
from tests.unit.test_decompose import VARIANTS, build


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("by", ["component", "head", "neuron"])
@pytest.mark.parametrize("with_wrong", [False, True])
def test_attributions_sum_to_the_logit(variant: str, by: str, with_wrong: bool) -> None:
    model = build(variant)
    tokens = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    answers, wrong = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 3])
    result = logit_attribution(model, cache, answers, wrong if with_wrong else None, by=by)
    expected = logits[torch.arange(3), -1, answers]
    if with_wrong:
        expected = expected - logits[torch.arange(3), -1, wrong]
    torch.testing.assert_close(result.actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.total(), expected, atol=1e-4, rtol=0)
    assert result.values.shape == (len(result.labels), 3)
    assert result.labels[-2:] == ["ln_final.b", "b_U"]


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_under_an_output_soft_cap_the_uncapped_logit_is_attributed(by: str) -> None:
    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=40, n_ctx=16, output_softcap=0.5
    )  # fmt: skip  (small: the cap bites)
    model = HookedTransformer(cfg, seed=2)
    tokens = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        capped, cache = model.run_with_cache(tokens)
        hidden = model(tokens, return_type="hidden")[:, -1]
    answers, wrong = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 3])
    result = logit_attribution(model, cache, answers, wrong, by=by)
    uncapped = hidden @ model.W_U + model.b_U
    rows = torch.arange(3)
    expected = uncapped[rows, answers] - uncapped[rows, wrong]
    torch.testing.assert_close(result.actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.total(), expected, atol=1e-4, rtol=0)
    capped_diff = capped[rows, -1, answers] - capped[rows, -1, wrong]
    assert not torch.allclose(capped_diff, expected, atol=1e-3)  # the cap did change the logits


def test_per_prompt_positions_under_right_padding() -> None:
    model = build("gpt2-like")
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[0, 5:] = 0
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    last = torch.tensor([4, 7])
    result = logit_attribution(model, cache, torch.tensor([3, 3]), pos=last, by="head")
    torch.testing.assert_close(result.total(), logits[torch.arange(2), last, 3], atol=1e-4, rtol=0)


def test_head_attribution_matches_component_attribution_per_layer() -> None:
    model = build("gpt2-like")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randint(0, 40, (2, 6)))
    by_head = logit_attribution(model, cache, 7, by="head")
    by_comp = logit_attribution(model, cache, 7, by="component")
    heads = dict(zip(by_head.labels, by_head.values, strict=True))
    comps = dict(zip(by_comp.labels, by_comp.values, strict=True))
    for layer in range(3):
        summed = sum(heads[f"L{layer}H{h}"] for h in range(4)) + heads[f"L{layer}_attn_bias"]
        torch.testing.assert_close(summed, comps[f"{layer}_attn_out"], atol=1e-5, rtol=0)


def test_bad_inputs() -> None:
    model = build("gpt2-like")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randint(0, 40, (2, 6)))
    with pytest.raises(ShapeMismatchError, match="one per prompt"):
        logit_attribution(model, cache, torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeMismatchError, match="outside a sequence"):
        logit_attribution(model, cache, 1, pos=6)
    with pytest.raises((ValueError, TypeError), match="by"):
        logit_attribution(model, cache, 1, by="layer")  # type: ignore[arg-type]


def test_frame_and_top() -> None:
    model = build("attn-only")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randint(0, 40, (2, 6)))
    result = logit_attribution(model, cache, [4, 5], by="head")
    frame = result.to_frame()
    assert set(frame.columns) == {"component", "prompt", "attribution"}
    assert len(frame) == 2 * len(result.labels)
    assert len(result.top(3)) == 3


def test_logit_lens_last_snapshot_is_the_output() -> None:
    model = build("gpt2-like")
    tokens = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    lens = logit_lens(model, cache)
    assert lens.labels[-1] == "final_post" and lens.logits.shape == (4, 2, 7, 40)
    torch.testing.assert_close(lens.logits[-1], logits, atol=1e-5, rtol=0)
    ranks = lens.token_ranks(logits.argmax(-1))
    assert (ranks[-1] == 0).all()
    assert len(lens.to_frame(tokens)) == 4 * 2 * 7
