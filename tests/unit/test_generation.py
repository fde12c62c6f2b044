"""Generation: cache vs recompute, padding, sampling, hooks, TransformerLens's arguments, errors.

The first part pins mitk's own guarantees (through ``return_type="result"``); the second
TransformerLens's meanings of ``generate``'s arguments and returns, with a hypothesis
test over argument combinations; the last ``KVCache``'s TransformerLens spellings.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import SequenceTooLongError, ShapeMismatchError
from mitk.model import NoTokenizerError, generation
from mitk.model.generation import GenerationArgumentError, KVCache, sample, step

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
    for tiny in (1e-40, 1e-300, 1e-30):  # below fp32's range, then within it: no NaNs
        assert torch.equal(sample(logits * 100, tiny, freq_penalty=1.0), (logits * 100).argmax(-1))


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


# --- TransformerLens's arguments and returns ---------------------------------------------


def test_return_type_follows_the_input_as_in_transformer_lens(gpt2: HookedTransformer) -> None:
    kw: dict[str, Any] = {"max_new_tokens": 3, "do_sample": False, "verbose": False}
    one = gpt2.generate("the cat sat", **kw)
    several = gpt2.generate(["the cat sat", "a dog"], **kw)
    assert isinstance(one, str) and one.startswith("the cat sat")
    assert isinstance(several, list) and len(several) == 2 and several[1].startswith("a dog")
    assert gpt2.generate(["the cat sat"], **kw) == one  # a list of one gives a str, as in TL
    tokens = gpt2.to_tokens(["the cat sat", "the dog ran"])
    out = gpt2.generate(tokens, **kw)
    assert isinstance(out, torch.Tensor) and out.shape == (2, tokens.shape[1] + 3)
    assert torch.equal(out[:, : tokens.shape[1]], tokens)
    assert gpt2.generate(tokens, return_type="str", **kw) == gpt2.tokenizer.batch_decode(
        out, skip_special_tokens=True
    )
    embeds = gpt2.generate(tokens, return_type="embeds", **kw)
    torch.testing.assert_close(embeds, gpt2.W_E[out], atol=0, rtol=0)
    result = gpt2.generate(tokens, return_type="result", **kw)
    assert torch.equal(result.tokens, out) and result.prompt_len == tokens.shape[1]


def test_text_batches_are_left_padded_whatever_padding_side_says(gpt2: HookedTransformer) -> None:
    kw: dict[str, Any] = {"max_new_tokens": 2, "do_sample": False, "verbose": False}
    prompts = ["the cat sat on a mat", "a dog"]
    right = gpt2.generate(prompts, padding_side="right", return_type="result", **kw)
    left = gpt2.generate(prompts, padding_side="left", return_type="result", **kw)
    assert torch.equal(right.tokens, left.tokens)
    assert right.attention_mask[:, right.prompt_len - 1].all()  # every row ends on a real token
    alone = gpt2.generate(prompts[1], return_type="tokens", **kw)
    assert torch.equal(left.new_tokens[1], alone[0, -2:])


def test_stop_at_eos_needs_an_eos_and_filler_is_what_tl_writes() -> None:
    model, (tokens, mask) = _model(), _prompts()
    kw: dict[str, Any] = {"do_sample": False, "verbose": False, "attention_mask": mask}
    with pytest.raises(GenerationArgumentError, match="eos_token_id"):
        model.generate(tokens, 3, **kw)  # no tokenizer, so no EOS to stop at
    free = model.generate(tokens, 6, stop_at_eos=False, **kw)
    first, second = int(free[0, 7]), int(free[1, 7])
    out = model.generate(tokens, 6, eos_token_id=[first, second], return_type="result", **kw)
    # a list of stops and no tokenizer: rows are padded with the list's first id
    ended = [row for row in range(3) if int(free[row, 7]) in (first, second)]
    assert ended and all((out.new_tokens[row, 1:] == first).all() for row in ended)
    assert all(not out.attention_mask[row, 8:].any() for row in ended)
    # eos_token_id is ignored without stop_at_eos, as in TransformerLens
    assert torch.equal(model.generate(tokens, 6, stop_at_eos=False, eos_token_id=first, **kw), free)


def test_freq_penalty_counts_each_rows_real_tokens() -> None:
    model, (tokens, mask) = _model(), _prompts()
    out = model.generate(tokens, 6, attention_mask=mask, stop_at_eos=False, freq_penalty=1e4,
                         seed=0, verbose=False, return_type="result")  # fmt: skip
    for row in range(3):
        real = out.tokens[row][out.attention_mask[row].bool()].tolist()
        assert len(set(real[-6:])) == 6 and not set(real[-6:]) & set(real[:-6])
    # prompt padding is not counted: fixed logits favour token 7 by 12 nats; row 0 holds
    # three 7s under its padding, row 1 three real ones (which the penalty of 5 outweighs)
    tokens[0, :3], tokens[1, :3] = 7, 7
    favour_7 = torch.zeros(VOCAB)
    favour_7[7] = 12.0
    fixed = [("unembed.hook_out", lambda logits, hook: favour_7.expand_as(logits).clone())]
    first = model.generate(tokens, 1, attention_mask=mask, stop_at_eos=False, freq_penalty=5.0,
                           seed=0, verbose=False, fwd_hooks=fixed)[:, -1]  # fmt: skip
    assert int(first[0]) == 7 and int(first[1]) != 7
    # the penalty is per count: every token seen once but the last leaves only the last
    logits = torch.zeros(1, VOCAB)
    counts = torch.zeros(1, VOCAB)
    counts[0, :-1] = 1.0
    draws = {int(sample(logits, 1.0, freq_penalty=50.0, token_counts=counts)) for _ in range(20)}
    assert draws == {VOCAB - 1}


def test_top_k_wins_over_top_p_as_in_transformer_lens() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)).repeat(300, 1)
    gen = torch.Generator().manual_seed(0)
    draws = set(sample(logits, 1.0, top_k=3, top_p=1e-6, generator=gen).tolist())
    assert draws == set(logits[0].topk(3).indices.tolist())


def test_verbose_shows_a_progress_bar(
    gpt2: HookedTransformer, capsys: pytest.CaptureFixture[str]
) -> None:
    gpt2.generate("the cat", max_new_tokens=2, do_sample=False, verbose=True)
    assert "2/2" in capsys.readouterr().err
    gpt2.generate("the cat", max_new_tokens=2, do_sample=False, verbose=False)
    assert capsys.readouterr().err == ""


def test_a_seed_draws_from_a_private_generator() -> None:
    model, (tokens, mask) = _model(), _prompts()
    state = torch.get_rng_state()
    model.generate(tokens, 3, attention_mask=mask, stop_at_eos=False, seed=1, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    one = model.generate(tokens, 3, attention_mask=mask, stop_at_eos=False, verbose=False)
    torch.manual_seed(7)
    two = model.generate(tokens, 3, attention_mask=mask, stop_at_eos=False, verbose=False)
    assert torch.equal(one, two)  # without a seed, torch's global generator, as in TL


def test_token_input_is_read_as_forward_reads_it(gpt2_dir: Path) -> None:
    """On a left padding side, leading pad ids are padding without a mask, as in forward."""
    left = HookedTransformer.from_pretrained(gpt2_dir, default_padding_side="left")
    pad = left.tokenizer.pad_token_id
    tokens = torch.tensor([[pad, pad, 5, 6, 7], [4, 9, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # the last leading pad is the BOS
    kw: dict[str, Any] = {"do_sample": False, "verbose": False, "return_type": "result"}
    for cache in (True, False):
        inferred = left.generate(tokens, 4, use_past_kv_cache=cache, **kw)
        explicit = left.generate(tokens, 4, use_past_kv_cache=cache, attention_mask=mask, **kw)
        assert torch.equal(inferred.tokens, explicit.tokens)
        torch.testing.assert_close(inferred.log_probs, explicit.log_probs, atol=1e-5, rtol=0)


NAN = st.just(float("nan"))
VALID_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "max_new_tokens": st.integers(1, 4),
    "stop_at_eos": st.booleans(),
    "eos_token_id": st.one_of(
        st.integers(0, VOCAB - 1), st.lists(st.integers(0, VOCAB - 1), max_size=3)
    ),
    "do_sample": st.booleans(),
    "top_k": st.one_of(st.none(), st.integers(1, VOCAB + 5)),
    "top_p": st.one_of(st.none(), st.floats(1e-6, 1.0)),
    "temperature": st.floats(0.0, 3.0),
    "freq_penalty": st.floats(0.0, 3.0),
    "use_past_kv_cache": st.booleans(),
    "padding_side": st.sampled_from([None, "left", "right"]),
    "return_type": st.sampled_from(["input", "tokens", "embeds", "result"]),
    "seed": st.one_of(st.none(), st.integers(0, 3)),
}
INVALID_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "max_new_tokens": st.integers(-3, 0),
    "eos_token_id": st.one_of(
        st.integers(-5, -1),
        st.integers(VOCAB, VOCAB + 5),
        st.lists(st.integers(0, VOCAB - 1), max_size=2).map(lambda ids: [*ids, VOCAB]),
    ),
    "top_k": st.integers(-3, 0),
    "top_p": st.one_of(st.floats(-1.0, 0.0), st.floats(1.0, 3.0, exclude_min=True), NAN),
    "temperature": st.one_of(st.floats(-3.0, 0.0, exclude_max=True), NAN),
    "freq_penalty": st.one_of(st.floats(-3.0, 0.0, exclude_max=True), NAN),
    "padding_side": st.sampled_from(["middle", "LEFT", ""]),
    "return_type": st.sampled_from(["logits", "both", "", "STR"]),
}


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_argument_combination_gives_a_valid_result_or_a_clear_error(data: Any) -> None:
    """Valid arguments give a well-formed continuation; one bad argument, a clear error."""
    model, (tokens, mask) = _ARGS_MODEL, _prompts()
    args = {name: data.draw(strategy, label=name) for name, strategy in VALID_ARGS.items()}
    broken = data.draw(st.sampled_from([None, *INVALID_ARGS]), label="broken")
    if broken is not None:
        args[broken] = data.draw(INVALID_ARGS[broken], label=f"bad {broken}")
        args["stop_at_eos"] = args["stop_at_eos"] or broken == "eos_token_id"
        with pytest.raises(GenerationArgumentError, match=broken):
            model.generate(tokens, attention_mask=mask, verbose=False, **args)
        return
    out = model.generate(tokens, attention_mask=mask, verbose=False, **args)
    result = out if args["return_type"] == "result" else None
    if args["return_type"] == "embeds":
        assert out.shape[0] == 3 and out.shape[2] == model.cfg.d_model
        return
    got = out.tokens if result is not None else out
    new, limit = got.shape[1] - tokens.shape[1], args["max_new_tokens"]
    assert got.shape[0] == 3 and 1 <= new <= limit
    assert torch.equal(got[:, : tokens.shape[1]], tokens)  # the prompt is kept as given
    assert int(got.min()) >= 0 and int(got.max()) < VOCAB
    if new < limit:  # only when every row has ended
        eos = args["eos_token_id"]
        stops = torch.tensor([eos] if isinstance(eos, int) else eos, dtype=torch.long)
        assert args["stop_at_eos"] and all(bool(torch.isin(row, stops).any()) for row in got)
    if result is not None:
        assert result.log_probs.shape == (3, new) and bool((result.log_probs <= 0).all())


_ARGS_MODEL = _model()


def test_a_wrong_type_gets_a_clear_error_without_beartype() -> None:
    """What a caller without runtime type checks sees (tests run with beartype on)."""
    plain = inspect.unwrap(generation.generate)
    model, (tokens, _) = _model(), _prompts()
    for bad in ({"freq_penalty": "a"}, {"temperature": None}, {"top_k": 2.5}, {"top_p": "x"},
                {"max_new_tokens": 2.0}, {"seed": "s"}, {"eos_token_id": ["x"]}):  # fmt: skip
        with pytest.raises(GenerationArgumentError, match=next(iter(bad))):
            plain(model, tokens, **{"max_new_tokens": 2, "verbose": False, **bad})
    with pytest.raises(GenerationArgumentError, match="embeddings"):
        plain(model, torch.randn(1, 3, model.cfg.d_model), verbose=False)
    with pytest.raises(GenerationArgumentError, match="list"):
        plain(model, [1, 2], verbose=False)
    with pytest.raises(NoTokenizerError):  # refused before generating, not after
        model.generate(tokens, 2, stop_at_eos=False, return_type="str", verbose=False)


# --- KVCache: TransformerLens's spellings --------------------------------------------------


def test_init_cache_checks_the_batch_and_a_frozen_cache_is_never_extended() -> None:
    model = _model()
    tokens = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = KVCache.init_cache(model.cfg, "cpu", batch_size=3)
    with pytest.raises(ShapeMismatchError, match="batch of 3"), torch.no_grad():
        model(tokens, past_kv_cache=cache)
    cache = KVCache.init_cache(model.cfg, None, batch_size=2)
    assert cache.entries == [] and not cache.frozen
    with torch.no_grad():
        full = model(tokens)
        model(tokens[:, :4], past_kv_cache=cache)
        cache.freeze()
        kept = list(cache.layers)
        for _ in range(2):  # the same continuation twice: the cache does not grow
            step_logits = model(tokens[:, 4:], past_kv_cache=cache)
            torch.testing.assert_close(step_logits, full[:, 4:], atol=1e-5, rtol=0)
        assert cache.length == 4 and all(a is b for a, b in zip(cache.layers, kept, strict=True))
        cache.unfreeze()
        model(tokens[:, 4:], past_kv_cache=cache)
    assert cache.length == 6
    for (k, _), entry in zip(cache.layers, cache.entries, strict=True):  # type: ignore[misc]
        assert entry.past_keys.shape == (2, 6, model.cfg.n_key_value_heads, model.cfg.d_head)
        assert torch.equal(entry.past_keys, k.transpose(1, 2))
        assert torch.equal(cache[0].past_values, cache.layers[0][1].transpose(1, 2))  # type: ignore[index]
