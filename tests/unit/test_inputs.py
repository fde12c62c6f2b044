"""Bad input fails with an error that names the problem."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import InvalidTokensError, MitkError, SequenceTooLongError, ShapeMismatchError
from mitk.model import NoTokenizerError


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        (
            torch.tensor([[1, 2, 50]]),
            InvalidTokensError,
            r"token id 50 at \[batch, pos\] = \[0, 2\]",
        ),
        (torch.tensor([[1, -1, 3]]), InvalidTokensError, "token id -1"),
        (torch.rand(1, 4), InvalidTokensError, "integer dtype"),
        (torch.zeros(1, 2, 3, dtype=torch.long), InvalidTokensError, "rank 3"),
        (torch.zeros(1, 0, dtype=torch.long), InvalidTokensError, "no positions"),
        (torch.zeros(1, 17, dtype=torch.long), SequenceTooLongError, "exceeds n_ctx=16"),
    ],
)
def test_bad_tokens(tiny: HookedTransformer, tokens, error, message) -> None:
    with pytest.raises(error, match=message) as info:
        tiny(tokens)
    assert isinstance(info.value, (MitkError, ValueError))


def test_one_dimensional_tokens_are_one_sequence(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (6,))
    torch.testing.assert_close(tiny(tokens), tiny(tokens[None]))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(2, 5), r"attention_mask has shape \(2, 5\)"),
        (torch.tensor([[1, 2, 1, 1]]), "only 0"),
        (torch.tensor([[0, 0, 0, 0]]), "row 0 masks every position"),
    ],
)
def test_bad_attention_masks(tiny: HookedTransformer, mask, message) -> None:
    with pytest.raises(ShapeMismatchError, match=message):
        tiny(torch.randint(0, 50, (1, 4)), attention_mask=mask)


def test_bad_residual_for_start_at_layer(tiny: HookedTransformer) -> None:
    with pytest.raises(ShapeMismatchError, match=r"\[batch, pos, 32\]"):
        tiny(torch.rand(1, 4, 31), start_at_layer=1)
    with pytest.raises(ShapeMismatchError, match="float residual"):
        tiny(torch.randint(0, 50, (1, 4)), start_at_layer=1)


def test_bad_layer_bounds_and_return_type(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 4))
    with pytest.raises(ValueError, match="stop_at_layer=5 is outside"):
        tiny(tokens, stop_at_layer=5)
    # at test time the Literal annotation is enforced first (TypeError); users get the ValueError
    with pytest.raises((ValueError, TypeError), match="return_type"):
        tiny(tokens, return_type="probs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs at least two positions"):
        tiny(tokens[:, :1], return_type="loss")


def test_text_without_tokenizer(tiny: HookedTransformer) -> None:
    with pytest.raises(NoTokenizerError, match="has no tokenizer"):
        tiny("hello")


def test_text_arguments_are_checked(tiny: HookedTransformer, gpt2: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 4))
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        tiny(tokens, padding_side="middle")  # no tokenizer, nothing padded: still a typo
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        gpt2.to_tokens("the cat", padding_side="up")
    with pytest.raises(ValueError, match="either text"):
        gpt2("the cat", attention_mask=torch.ones(1, 3))
    with pytest.raises(InvalidTokensError, match="string or a non-empty list"):
        gpt2.tokenize([])
    with pytest.raises(NoTokenizerError, match="has no tokenizer"):
        tiny.to_single_token("cat")


def test_return_type_in_transformer_lens_position_is_explained() -> None:
    from mitk.model.inputs import checked_attention_mask

    # forward's annotation refuses a string first under test; users reach this message
    with pytest.raises(ShapeMismatchError, match="pass return_type= by keyword"):
        checked_attention_mask("loss", (1, 4))
