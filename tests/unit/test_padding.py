"""Left and right padding: real tokens get the same outputs as each sequence run alone."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer


def pad_batch(
    seqs: list[torch.Tensor], side: str, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        tokens[row, cols], mask[row, cols] = seq, 1
    return tokens, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_padded_batch_equals_solo_runs(gpt2: HookedTransformer, side: str, backend: str) -> None:
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, 97, (n,), generator=gen) for n in (9, 4, 7)]
    tokens, mask = pad_batch(seqs, side)
    names = ["blocks.2.hook_resid_post", "blocks.1.attn.hook_z"]
    with torch.no_grad(), gpt2.backend(backend):  # type: ignore[arg-type]
        logits, cache = gpt2.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        for row, seq in enumerate(seqs):
            solo_logits, solo = gpt2.run_with_cache(seq[None], names_filter=names)
            real = mask[row].bool()
            torch.testing.assert_close(logits[row, real], solo_logits[0], atol=1e-5, rtol=0)
            for name in names:
                torch.testing.assert_close(cache[name][row, real], solo[name][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_loss_equals_mean_over_real_pairs(gpt2: HookedTransformer, side: str) -> None:
    gen = torch.Generator().manual_seed(12)
    seqs = [torch.randint(1, 97, (n,), generator=gen) for n in (8, 5)]
    tokens, mask = pad_batch(seqs, side)
    with torch.no_grad():
        batched = gpt2(tokens, attention_mask=mask, return_type="loss")
        solo = [gpt2(s[None], return_type="loss") for s in seqs]
    pairs = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.float32)
    expected = (torch.stack(solo) * pairs).sum() / pairs.sum()
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)


def test_text_input_pads_and_masks_for_you(gpt2: HookedTransformer) -> None:
    texts = ["the cat sat on a mat", "a dog ran"]
    with torch.no_grad():
        batched = gpt2(texts)
        solo = gpt2("a dog ran")
    _, mask = gpt2.tokenize(texts)
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]  # BOS + 3 words, right-padded
    torch.testing.assert_close(batched[1, :4], solo[0], atol=1e-5, rtol=0)
