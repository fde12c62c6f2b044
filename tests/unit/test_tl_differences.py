"""Places where mitk silently differed from TransformerLens, now the same (issue 14's first list).

Each test failed before its fix: an edit to one row of ``hook_pos_embed`` leaked
into every row; ``pos_embed(tokens)`` looked up token ids; the tokenizer's
``padding_side`` was ignored for text; ``to_str_tokens`` refused lists;
``remove_batch_dim`` returned a copy. (``stack_neuron_results``'s layer meaning
and ``FactoredMatrix.svd`` are tested with the decompositions and circuits.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import ShapeMismatchError


def test_a_pos_embed_hook_may_edit_one_row_in_place(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    W_pos = tiny.pos_embed.W_pos.detach().clone()

    def bump_row_0(pos: torch.Tensor, hook: object) -> torch.Tensor:
        pos[0] += 1.0  # in place, as TransformerLens notebooks do
        return pos

    with torch.no_grad():
        _, plain = tiny.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
        with tiny.hooks([("hook_pos_embed", bump_row_0)]):
            _, edited = tiny.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    before, after = plain["blocks.0.hook_resid_pre"], edited["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(after[0], before[0] + 1.0)
    torch.testing.assert_close(after[1:], before[1:], atol=0, rtol=0)
    assert torch.equal(tiny.pos_embed.W_pos, W_pos)  # the weights are untouched


def test_pos_embed_of_tokens_looks_up_positions(tiny: HookedTransformer) -> None:
    tokens = torch.tensor([[7, 3, 9, 1], [2, 2, 2, 2]])
    W_pos = tiny.pos_embed.W_pos
    out = tiny.pos_embed(tokens)
    assert out.shape == (2, 4, tiny.cfg.d_model)
    torch.testing.assert_close(out, W_pos[:4].expand(2, 4, -1))
    torch.testing.assert_close(tiny.pos_embed(tokens, past_kv_pos_offset=3)[0], W_pos[3:7])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # offset 2, row 0 left-padded
    padded = tiny.pos_embed(tokens, past_kv_pos_offset=2, attention_mask=mask)
    torch.testing.assert_close(padded[0], W_pos[:4])  # counts real tokens only
    torch.testing.assert_close(padded[1], W_pos[2:6])
    left = tiny.pos_embed(tokens[:, :3], attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert torch.equal(left[0, 0], torch.zeros(tiny.cfg.d_model))  # padded slot: zeros
    out[0, 0] += 1  # a fresh tensor: editing it leaves the weights alone
    torch.testing.assert_close(tiny.pos_embed(tokens)[0, 0], W_pos[0])


def test_tokenizer_padding_side_is_honoured_for_text(gpt2_dir: Path) -> None:
    model = HookedTransformer.from_pretrained(gpt2_dir, default_padding_side="left")
    _, mask = model.tokenize(["the cat", "a red house when"])
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left padded
    model.tokenizer.padding_side = "right"
    _, mask = model.tokenize(["the cat", "a red house when"])
    assert mask[0, 0] == 1 and mask[0, -1] == 0
    assert model.to_tokens(["the cat", "a red house when"], padding_side="left")[0, 0] == (
        model.tokenizer.pad_token_id
    )
    with pytest.raises(ValueError, match="padding_side"):
        HookedTransformer.from_pretrained(gpt2_dir, default_padding_side="middle")


def test_left_padded_text_forward_equals_right_padded(gpt2_dir: Path) -> None:
    texts = ["the cat", "a red house when"]
    left = HookedTransformer.from_pretrained(gpt2_dir, default_padding_side="left")
    right = HookedTransformer.from_pretrained(gpt2_dir)
    with torch.no_grad():
        out_left, out_right = left(texts), right(texts)
    _, l_mask = left.tokenize(texts)
    _, r_mask = right.tokenize(texts)
    assert not torch.equal(l_mask, r_mask)
    torch.testing.assert_close(out_left[l_mask.bool()], out_right[r_mask.bool()], atol=1e-4, rtol=0)


def test_to_str_tokens_takes_lists_and_tensors(gpt2: HookedTransformer) -> None:
    words = gpt2.to_str_tokens("the cat sat", prepend_bos=False)
    assert words == ["the", "cat", "sat"]
    ids = gpt2.to_tokens("the cat sat", prepend_bos=False)
    assert gpt2.to_str_tokens(ids) == words  # [1, pos]
    assert gpt2.to_str_tokens(ids[0]) == words
    assert gpt2.to_str_tokens(ids[0].tolist()) == words
    assert gpt2.to_str_tokens(ids[0].numpy()) == words
    assert gpt2.to_str_tokens(["the cat", "sat"], prepend_bos=False) == [["the", "cat"], ["sat"]]
    assert gpt2.to_str_tokens([ids[0], ids[0, :1]]) == [words, ["the"]]
    with pytest.raises(ValueError, match="one sequence"):
        gpt2.to_str_tokens(torch.cat([ids, ids]))


def test_remove_batch_dim_works_in_place(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    _, cache = tiny.run_with_cache(tokens, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    same = cache.remove_batch_dim()
    assert same is cache and not cache.has_batch_dim
    assert cache["hook_embed"].shape == (5, tiny.cfg.d_model)
    assert cache.remove_batch_dim() is cache  # already removed: unchanged
    _, two = tiny.run_with_cache(torch.cat([tokens, tokens]), names_filter="hook_embed")
    with pytest.raises(ShapeMismatchError, match="batch size 1"):
        two.remove_batch_dim()
    assert two.has_batch_dim and two["hook_embed"].shape[0] == 2


def test_sinusoidal_pos_embed_of_tokens(tiny_cfg: TransformerConfig) -> None:
    model = HookedTransformer(tiny_cfg.replace(positional="sinusoidal"))
    tokens = torch.zeros(2, 5, dtype=torch.long)
    table = model.pos_embed.at(torch.arange(5)[None])[0]
    torch.testing.assert_close(model.pos_embed(tokens), table.expand(2, 5, -1))
