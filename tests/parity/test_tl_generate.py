"""``generate`` against transformer-lens 3.9's on the same GPT-2 weights: tokens, text, sampling.

Both models load one random GPT-2 checkpoint (``save_checkpoint``: wide weights and an
untied, sharpened head, so greedy choices are well separated and follow the context)
with the extended word tokenizer of ``test_tl_generation``. Greedy decoding must give
identical tokens and text, with and without the key-value cache, for padded batches
of text, token input, and with rows stopping at EOS. Sampling draws from torch's global
generator in both, in the same order, so the same seed gives the same tokens;
distribution-level checks (top-k = 1 is greedy, top-k draws stay in the top k) hold
without that coincidence.
Token prompts avoid id 0 (the pad id): under a right padding side transformer-lens
reads trailing pad ids as padding, which mitk does not (a row must end on a real token).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mitk import HookedTransformer
from tests.parity.test_transformer_lens import _tl_hooked_transformer, tl_deprecation
from tests.unit.test_tl_generation import save_checkpoint, tokenizer

pytestmark = tl_deprecation
PROMPTS = ["the cat sat on", "a dog", "the big red house was very"]
NEW = 8
VOCAB = len(tokenizer())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2_sharp"))


@pytest.fixture(scope="module")
def pair(checkpoint: Path) -> Iterator[tuple[HookedTransformer, Any]]:
    """mitk's model and transformer-lens's HookedTransformer on the same weights and tokenizer."""
    from transformers import AutoTokenizer

    tl = _tl_hooked_transformer(checkpoint)
    tl.set_tokenizer(AutoTokenizer.from_pretrained(checkpoint))
    yield HookedTransformer.from_pretrained(checkpoint), tl


def _both(pair: tuple[HookedTransformer, Any], input: Any, **kw: Any) -> tuple[Any, Any]:
    """Each library's ``generate`` on the same input and arguments (no progress bar).

    ``prepend_bos`` is passed, as the two models' defaults differ (the TL model is built
    with ``default_prepend_bos=False``).
    """
    ours, tl = pair
    kw = {"verbose": False, "max_new_tokens": NEW, "prepend_bos": True, **kw}
    return ours.generate(input, **kw), tl.generate(input, **kw)


def _tokens(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_greedy_text_batches_match(
    pair: tuple[HookedTransformer, Any], use_past_kv_cache: bool, prepend_bos: bool
) -> None:
    kw = {"do_sample": False, "use_past_kv_cache": use_past_kv_cache, "prepend_bos": prepend_bos}
    ours, theirs = _both(pair, PROMPTS, return_type="tokens", **kw)
    assert ours.tolist() == theirs.tolist()
    assert (ours[:, -NEW:] != ours[:, -NEW - 1 : -1]).any()  # not an echo of the input
    ours, theirs = _both(pair, PROMPTS, **kw)
    assert isinstance(ours, list) and ours == theirs
    ours, theirs = _both(pair, PROMPTS[0], **kw)
    assert isinstance(ours, str) and ours == theirs


def test_right_padding_side_is_overridden_for_batches_as_in_tl(
    pair: tuple[HookedTransformer, Any],
) -> None:
    kw = {"do_sample": False, "padding_side": "right"}
    ours, theirs = _both(pair, PROMPTS, return_type="tokens", **kw)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_greedy_token_input_matches(
    pair: tuple[HookedTransformer, Any], use_past_kv_cache: bool
) -> None:
    tokens = _tokens(2, 6, seed=1)
    ours, theirs = _both(pair, tokens, do_sample=False, use_past_kv_cache=use_past_kv_cache)
    assert isinstance(ours, torch.Tensor) and ours.tolist() == theirs.tolist()
    ours, theirs = _both(pair, tokens, do_sample=False, return_type="str")
    assert ours == theirs


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_rows_stop_at_eos_and_are_padded_as_in_tl(
    pair: tuple[HookedTransformer, Any], use_past_kv_cache: bool
) -> None:
    free, _ = _both(pair, PROMPTS, do_sample=False, stop_at_eos=False, return_type="tokens")
    prompt_len = free.shape[1] - NEW
    new = free[:, prompt_len:]
    # a token one row emits and another never emits before its last step: rows end apart
    row, eos = next(
        (r, tok)
        for r in range(len(PROMPTS))
        for tok in new[r].tolist()
        if not bool((new[:, :-1] == tok).any(-1).all())
    )
    kw = {"do_sample": False, "return_type": "tokens", "use_past_kv_cache": use_past_kv_cache}
    ours, theirs = _both(pair, PROMPTS, eos_token_id=eos, **kw)
    assert ours.tolist() == theirs.tolist()
    stop = new[row].tolist().index(eos)
    assert ours[row, prompt_len:].tolist() == [*new[row, :stop].tolist(), *[eos] * (NEW - stop)]
    assert not torch.equal(ours, free)
    # a list of stops: filler is the tokenizer's EOS (id 0), not the first stop
    stops = [eos, int(new[(row + 1) % len(PROMPTS), 2])]
    ours, theirs = _both(pair, PROMPTS, eos_token_id=stops, **kw)
    assert ours.tolist() == theirs.tolist()
    stop = min(new[row].tolist().index(s) for s in stops if s in new[row].tolist())
    assert (ours[row, prompt_len + stop + 1 :] == 0).all()
    ours, theirs = _both(pair, PROMPTS, do_sample=False, eos_token_id=eos)
    assert ours == theirs


def test_embeds_return_matches(pair: tuple[HookedTransformer, Any]) -> None:
    ours, theirs = _both(pair, PROMPTS, do_sample=False, return_type="embeds")
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize(
    "sampling",
    [
        {},
        {"temperature": 0.7},
        {"top_k": 5},
        {"top_p": 0.6},
        {"top_k": 3, "top_p": 0.1},  # TransformerLens ignores top_p when top_k is given
        {"temperature": 1.5, "top_p": 0.9},
        {"temperature": 0.0},
    ],
)
def test_sampling_with_the_same_global_seed_draws_the_same_tokens(
    pair: tuple[HookedTransformer, Any], sampling: dict[str, Any]
) -> None:
    ours, tl = pair
    kw = {"max_new_tokens": NEW, "verbose": False, "return_type": "tokens", "prepend_bos": True}
    for seed in range(3):
        torch.manual_seed(seed)
        mine = ours.generate(PROMPTS, **kw, **sampling)
        torch.manual_seed(seed)
        theirs = tl.generate(PROMPTS, **kw, **sampling)
        assert mine.tolist() == theirs.tolist()


def test_freq_penalty_matches_on_unpadded_prompts(pair: tuple[HookedTransformer, Any]) -> None:
    # mitk counts only real tokens; without padding both count the same ones
    ours, tl = pair
    tokens = _tokens(3, 5, seed=4)
    kw = {"max_new_tokens": NEW, "verbose": False, "stop_at_eos": False}
    for penalty in (0.5, 3.0):
        torch.manual_seed(11)
        mine = ours.generate(tokens, freq_penalty=penalty, **kw)
        torch.manual_seed(11)
        theirs = tl.generate(tokens, freq_penalty=penalty, **kw)
        assert mine.tolist() == theirs.tolist()
    torch.manual_seed(11)
    plain = ours.generate(tokens, **kw)
    torch.manual_seed(11)
    assert not torch.equal(plain, ours.generate(tokens, freq_penalty=3.0, **kw))


def test_top_k_one_is_greedy_and_top_k_draws_stay_in_the_top_k(
    pair: tuple[HookedTransformer, Any],
) -> None:
    ours, tl = pair
    tokens = _tokens(4, 5, seed=2)
    greedy = tl.generate(tokens, max_new_tokens=NEW, do_sample=False, verbose=False)
    one = ours.generate(tokens, max_new_tokens=NEW, top_k=1, verbose=False, seed=0)
    assert one.tolist() == greedy.tolist()
    # one step from a fixed prompt, many draws: every token lies in TL's top 3 of that step
    prompt = tokens[:1].repeat(300, 1)
    drawn = ours.generate(prompt, max_new_tokens=1, top_k=3, verbose=False, seed=1)[:, -1]
    with torch.no_grad():
        top3 = tl(tokens[:1])[0, -1].topk(3).indices
    assert set(drawn.tolist()) == set(top3.tolist())
