"""TransformerLens's tokenization-method tests, ported to mitk.

Ported from TransformerLens's tokenization tests (the module that builds ``solu-1l`` at
import and tests ``set_tokenizer``, ``to_tokens``, ``to_string``, ``to_str_tokens``,
``to_single_token``, ``to_single_str_token``, ``get_token_position`` and
``tokens_to_residual_directions``). The model is a random local one-layer GPT-2 with
``d_model=512`` and ``n_ctx=1024``, the sizes the assertions read, and the word tokenizer
of ``tests/checkpoints.py`` (handed to each test as a fixture instead of a module
global). Where an assertion names ids or strings of the hub tokenizer (``" Solid"``,
``11765``), the input is replaced by a sentence of the word vocabulary and the expected
value by what that tokenizer gives (noted at each); the checks themselves are kept. One
test is marked as a documented difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Size, equal, tensor
from transformers import AutoTokenizer

from mitk import HookedTransformer, TransformerConfig
from tests.checkpoints import save_gpt2


@pytest.fixture(scope="module")
def solu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """solu-1l's stand-in: one layer, d_model 512, n_ctx 1024, the word tokenizer."""
    directory = tmp_path_factory.mktemp("one_layer_512")
    return save_gpt2(directory, n_layer=1, n_embd=512, n_head=8, n_positions=1024)


@pytest.fixture(scope="module")
def model(solu_dir: Path) -> HookedTransformer:
    return HookedTransformer.from_pretrained(solu_dir)


def test_set_tokenizer_during_initialization(model, solu_dir):
    assert model.tokenizer is not None and model.tokenizer.name_or_path == str(solu_dir), (
        "initialized with expected tokenizer"
    )
    assert model.cfg.d_vocab == 97, "expected d_vocab"  # TransformerLens: 48262


def test_set_tokenizer_lazy(solu_dir):
    cfg = TransformerConfig(  # TransformerLens's sizes; mitk needs n_heads (d_model / d_head)
        n_layers=1, d_model=10, n_ctx=1024, d_head=1, n_heads=10, act_fn="relu", d_vocab=50256
    )
    model2 = HookedTransformer(cfg)
    original_tokenizer = model2.tokenizer
    assert original_tokenizer is None, "initialize without tokenizer"
    model2.set_tokenizer(AutoTokenizer.from_pretrained(solu_dir))
    tokenizer = model2.tokenizer
    assert tokenizer is not None and tokenizer.name_or_path == str(solu_dir), "set tokenizer"
    # TransformerLens: " SolidGoldMagikarp" is the single token 43453
    assert model2.to_single_token("cat") == 3, "Glitch token didn't tokenize properly"
    assert model2.to_string([3]) == "cat", "Glitch token didn't detokenize properly"


def test_to_tokens_default(model):
    s = "the cat sat on a mat"  # TransformerLens: "Hello, world!" -> [[1, 11765, 14, 1499, 3]]
    tokens = model.to_tokens(s)
    assert equal(tokens, tensor([[0, 2, 3, 4, 5, 6, 7]]).to(model.cfg.device)), (
        "creates a tensor of tokens with BOS"
    )


def test_to_tokens_without_bos(model):
    s = "the cat sat on a mat"
    tokens = model.to_tokens(s, prepend_bos=False)
    assert equal(tokens, tensor([[2, 3, 4, 5, 6, 7]]).to(model.cfg.device)), (
        "creates a tensor without BOS"
    )


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(),
    reason="Test not relevant when running on GPU",
)
def test_to_tokens_device(model):
    s = "Hello, world!"
    tokens1 = model.to_tokens(s, move_to_device=False)
    tokens2 = model.to_tokens(s, move_to_device=True)
    assert equal(tokens1, tokens2), "move to device has no effect when running tests on CPU"


def test_to_tokens_truncate(model):
    assert model.cfg.n_ctx == 1024, "verify assumed context length"
    s = "@ " * 1026  # TransformerLens: 1025, which its tokenizer reads as 1026 tokens
    tokens1 = model.to_tokens(s)
    tokens2 = model.to_tokens(s, truncate=False)
    assert len(tokens1[0]) == 1024, "truncated by default"
    assert len(tokens2[0]) == 1027, "not truncated"


def test_to_string_from_to_tokens_without_bos(model):
    s = "the cat sat on a mat"  # TransformerLens: "Hello, world!"
    tokens = model.to_tokens(s, prepend_bos=False)
    s2 = model.to_string(tokens[0])
    assert s == s2, "same string when converted back to string"


def test_to_string_multiple(model):
    s_list = model.to_string(tensor([[0, 2], [3, 4]]))
    assert s_list == [
        "<|endoftext|> the",  # TransformerLens: "<|BOS|>Hello", "Charlie Planet"
        "cat sat",
    ], "can handle list of lists"


def test_to_str_tokens_default(model):
    s_list = model.to_str_tokens("the cat")  # TransformerLens: " SolidGoldMagikarp"
    assert s_list == [
        "<|endoftext|>",
        "the",
        "cat",
    ], "not a glitch token"


def test_to_str_tokens_without_bos(model):
    s_list = model.to_str_tokens("the cat", prepend_bos=False)
    assert s_list == [
        "the",
        "cat",
    ], "without BOS"


def test_to_single_token(model):
    token = model.to_single_token("mat")  # TransformerLens: "biomolecules" -> 31847
    assert token == 7, "single token"


def test_to_single_str_tokent(model):
    s = model.to_single_str_token(7)
    assert s == "mat"


@pytest.mark.xfail(
    reason="documented difference: mitk's error names the token and is a MitkError "
    "(TokenNotFoundError, also an AssertionError); the message is not TransformerLens's",
    raises=AssertionError,
    strict=True,
)
def test_get_token_position_not_found(model):
    single = "mat"  # TransformerLens: "biomolecules" in "There were some biomolecules"
    input = "the cat sat on a dog"
    with pytest.raises(AssertionError) as exc_info:
        model.get_token_position(single, input)
    assert str(exc_info.value) == "The token does not occur in the prompt", "assertion error"


def test_get_token_position_str(model):
    single = "sat"  # TransformerLens: " some" in "There were some biomolecules"
    input = "the cat sat on a mat"
    pos = model.get_token_position(single, input)
    assert pos == 3, "first position"


def test_get_token_position_str_without_bos(model):
    single = "sat"
    input = "the cat sat on a mat"
    pos = model.get_token_position(single, input, prepend_bos=False)
    assert pos == 2, "without BOS"


def test_get_token_position_int_pos(model):
    single = 2
    input = tensor([2.0, 3, 4])
    pos1 = model.get_token_position(single, input)
    pos2 = model.get_token_position(single, input, prepend_bos=False)
    assert pos1 == 0, "first position"
    assert pos2 == 0, "no effect from BOS when using tensor as input"


def test_get_token_position_int_pos_last(model):
    single = 2
    input = tensor([2.0, 3, 4, 2, 5])
    pos1 = model.get_token_position(single, input, mode="last")
    assert pos1 == 3, "last position"


def test_get_token_position_int_1_pos(model):
    single = 2
    input = tensor([[2.0, 3, 4]])
    pos = model.get_token_position(single, input)
    assert pos == 0, "first position"


def test_tokens_to_residual_directions(model):
    res_dir = model.tokens_to_residual_directions(model.to_tokens(""))
    assert res_dir.shape == Size([512]), ""


# --- mitk's own ---------------------------------------------------------------------------


def test_token_errors_name_the_problem(model) -> None:
    from mitk.errors import InvalidTokensError, MitkError, ShapeMismatchError
    from mitk.model.tokenization import NotASingleTokenError, TokenNotFoundError

    with pytest.raises(NotASingleTokenError, match=r"'the cat' is not a single token.*'cat'"):
        model.to_single_token("the cat")
    with pytest.raises(NotASingleTokenError, match="0 tokens"):
        model.to_single_token("")
    with pytest.raises(TokenNotFoundError, match="token 7 does not occur"):
        model.get_token_position("mat", "the cat")
    with pytest.raises(ValueError, match="mode must be 'first' or 'last'"):
        model.get_token_position("cat", "the cat", mode="middle")
    with pytest.raises(ShapeMismatchError, match=r"\[1, pos\]"):
        model.get_token_position(2, torch.tensor([[2, 3], [2, 3]]))
    with pytest.raises(InvalidTokensError, match="list of tokens"):
        model.tokens_to_residual_directions([])
    for err in (NotASingleTokenError, TokenNotFoundError):
        assert issubclass(err, MitkError) and issubclass(err, AssertionError)
