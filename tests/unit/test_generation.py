"""Generation with a key-value cache: cache vs recompute, padding, sampling, hooks, bad inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import SequenceTooLongError
from mitk.model.generation import KVCache, sample, step

VOCAB = 50
VARIANTS: dict[str, dict[str, Any]] = {
    "learned": {},
    "sinusoidal": {"positional": "sinusoidal"},
    "rotary-gqa-window": {
        "positional": "rotary",
        "n_key_value_heads": 2,
        "sliding_window": 5,
        "normalization": "rmsnorm",
    },
    "alibi": {"positional": "alibi"},
}


def _model(**kw: Any) -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=VOCAB, n_ctx=32, **kw)
    model = HookedTransformer(cfg, seed=1)
    with torch.no_grad():  # GPT-2 init gives near-uniform logits; sharpen them so argmax is stable
        model.unembed.W_U.mul_(50.0)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return _model(**VARIANTS[request.param])


def _generate(model: HookedTransformer, tokens: torch.Tensor, n: int, **kw: Any) -> Any:
    """mitk's ``generate`` as these tests use it: greedy, no EOS, no bar, the full result."""
    settings = {"do_sample": False, "stop_at_eos": False, "verbose": False, "return_type": "result"}
    return model.generate(tokens, n, **{**settings, **kw})


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    return tokens, mask


def test_cached_steps_equal_a_full_recompute(model: HookedTransformer) -> None:
    tokens, mask = _prompts()
    cached = _generate(model, tokens, 6, attention_mask=mask)
    full = _generate(model, tokens, 6, attention_mask=mask, use_past_kv_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.log_probs, full.log_probs, atol=1e-5, rtol=0)
    # logits of every step: the cache against a padded forward over the generated sequence
    cache, key_valid = KVCache(model.cfg.n_layers), cached.attention_mask.bool()
    with torch.no_grad():
        reference = model(cached.tokens, attention_mask=key_valid)
        width = tokens.shape[1]
        logits = [step(model, cached.tokens[:, :width], key_valid[:, :width], cache)]
        for end in range(width + 1, cached.tokens.shape[1]):
            logits.append(step(model, cached.tokens[:, end - 1 : end], key_valid[:, :end], cache))
    torch.testing.assert_close(
        torch.stack(logits, 1), reference[:, width - 1 : -1], atol=1e-5, rtol=0
    )


def test_left_padded_rows_generate_what_they_generate_alone(model: HookedTransformer) -> None:
    tokens, mask = _prompts()
    batched = _generate(model, tokens, 5, attention_mask=mask)
    for row in range(tokens.shape[0]):
        alone = _generate(model, tokens[row][mask[row].bool()][None], 5)
        assert torch.equal(batched.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(batched.log_probs[row], alone.log_probs[0], atol=1e-5, rtol=0)


def test_eos_stops_a_row_and_pads_after_it() -> None:
    model = _model()
    tokens = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    free = _generate(model, tokens, 6, eos_token_id=())
    eos = int(free.new_tokens[0, 1])  # row 0 emits it second
    out = _generate(model, tokens, 6, stop_at_eos=True, eos_token_id=eos, pad_token_id=0)
    first = (
        int((free.new_tokens[1] == eos).nonzero()[0]) if (free.new_tokens[1] == eos).any() else 6
    )
    assert out.new_tokens[0, :2].tolist() == free.new_tokens[0, :2].tolist()
    assert (out.new_tokens[0, 2:] == 0).all() and not out.attention_mask[0, 4 + 2 :].any()
    assert (out.log_probs[0, 2:] == 0).all()
    assert out.new_tokens.shape[1] == min(6, max(2, first + 1))


def test_sampling_is_reproducible_with_a_seed() -> None:
    model, (tokens, mask) = _model(), _prompts()
    one = _generate(model, tokens, 6, attention_mask=mask, do_sample=True, seed=3)
    two = _generate(model, tokens, 6, attention_mask=mask, do_sample=True, seed=3)
    other = _generate(model, tokens, 6, attention_mask=mask, do_sample=True, seed=4)
    assert torch.equal(one.tokens, two.tokens)
    assert not torch.equal(one.tokens, other.tokens)


def test_top_k_and_top_p_never_sample_outside_their_set() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    many = logits.repeat_interleave(200, dim=0)  # 200 draws per row in one call
    top3 = logits.topk(3, dim=-1).indices
    draws = sample(many, 1.0, top_k=3, generator=gen).view(4, 200)
    assert all(set(draws[r].tolist()) <= set(top3[r].tolist()) for r in range(4))
    assert all(len(set(draws[r].tolist())) == 3 for r in range(4))  # and does use all three
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    n_keep = ((sorted_probs.cumsum(-1) - sorted_probs) <= 0.5).sum(-1)  # as TransformerLens
    draws = sample(many, 1.0, top_p=0.5, generator=gen).view(4, 200)
    for r in range(4):
        assert set(draws[r].tolist()) <= set(order[r, : n_keep[r]].tolist())
        assert len(set(draws[r].tolist())) == int(n_keep[r])  # the nucleus is not over-trimmed


def test_temperature_zero_is_greedy_and_tiny_temperature_matches_it() -> None:
    model, (tokens, mask) = _model(), _prompts()
    greedy = _generate(model, tokens, 5, attention_mask=mask)
    cold = _generate(
        model, tokens, 5, attention_mask=mask, do_sample=True, temperature=1e-6, seed=0
    )
    assert torch.equal(greedy.tokens, cold.tokens)
    logits = torch.randn(3, VOCAB)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_hooks_fire_each_step_and_can_steer(model: HookedTransformer) -> None:
    tokens, mask = _prompts()
    seen: list[int] = []
    record = [("blocks.0.hook_resid_pre", lambda x, h: seen.append(x.shape[1]))]
    with model.hooks(record):
        _generate(model, tokens, 4, attention_mask=mask)
    assert seen == [7, 1, 1, 1]  # the prompt, then only the new position
    seen.clear()
    _generate(model, tokens, 3, attention_mask=mask, use_past_kv_cache=False, fwd_hooks=record)
    assert seen == [7, 8, 9]
    plain = _generate(model, tokens, 4, attention_mask=mask)
    push = model.W_U[:, 5] * 10.0  # steer every position toward token 5

    def steer(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + push

    steered = _generate(
        model, tokens, 4, attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_post", steer)]
    )
    assert not torch.equal(steered.new_tokens, plain.new_tokens)
    assert (steered.new_tokens == 5).all()
    assert all(not p.has_hooks for p in model.hook_dict.values())


def test_pattern_hooks_see_the_growing_key_axis(model: HookedTransformer) -> None:
    shapes: list[tuple[int, ...]] = []
    tokens, mask = _prompts()
    record = [("blocks.1.attn.hook_pattern", lambda p, h: shapes.append(p.shape[2:]))]
    _generate(model, tokens, 3, attention_mask=mask, fwd_hooks=record)
    assert shapes == [(7, 7), (1, 8), (1, 9)]


def test_bad_inputs_are_refused() -> None:
    model = _model()
    tokens = torch.randint(1, VOCAB, (1, 30))
    with pytest.raises(SequenceTooLongError, match="n_ctx=32"):
        _generate(model, tokens, 3)  # 30 + 3 positions, 32 learned
    with pytest.raises(ValueError, match="left padding"):
        _generate(model, tokens[:, :4], 2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            _generate(model, tokens[:, :4], 2, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _generate(model, tokens[:, :4], 0)
    rotary = _model(positional="rotary")
    assert _generate(rotary, tokens, 5).tokens.shape == (1, 35)  # rotary has no n_ctx limit


def test_text_in_and_out(gpt2: HookedTransformer) -> None:
    out = _generate(gpt2, ["the cat sat", "a dog"], 3)
    assert out.text is not None and len(out.text) == 2
    # row 1 is left-padded with the pad token (the same string as BOS): only its BOS is decoded
    assert "a dog" in out.text[1] and out.text[1].count("<|endoftext|>") == 1
    assert out.tokens.shape == (2, out.prompt_len + 3)
