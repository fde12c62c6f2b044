"""Reading a command's prompts: inline text, token files, synthetic induction probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from mitk import HookedTransformer
from mitk.cli.inputs import Prompts, read_prompts, read_token_matrix
from mitk.errors import ConfigError, InvalidTokensError
from mitk.model import NoTokenizerError


@pytest.fixture(scope="module")
def toy() -> HookedTransformer:
    return HookedTransformer.from_pretrained("toy-induction")


def prompts_from(model: HookedTransformer, **given: object) -> Prompts:
    options: dict[str, object] = {"prompt": None, "tokens_file": None, "induction": None}
    return read_prompts(model, **(options | given))  # type: ignore[arg-type]


def test_induction_probes_end_one_token_early_and_answer_with_it(toy: HookedTransformer) -> None:
    found = read_prompts(toy, prompt=None, tokens_file=None, induction=5, n_prompts=3, seed=1)
    assert found.tokens.shape == (3, 10) and found.attention_mask is None
    # the answer is the token after the current one's first occurrence: pure induction
    assert torch.equal(found.answers, found.tokens[:, 5])
    assert torch.equal(found.tokens[:, 1:5], found.tokens[:, 6:10])
    assert torch.equal(found.positions(-1), torch.full((3,), 9))


def test_jsonl_rows_are_padded_and_negative_positions_count_from_each_end(
    toy: HookedTransformer, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"tokens": [0, 5, 6, 7], "answer": 8, "wrong": 9},
        {"tokens": [0, 5], "answer": 3, "wrong": 4},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    found = read_prompts(toy, prompt=None, tokens_file=path, induction=None)
    assert found.tokens.tolist() == [[0, 5, 6, 7], [0, 5, 0, 0]]
    assert found.attention_mask is not None and found.attention_mask.tolist()[1] == [1, 1, 0, 0]
    assert found.answers.tolist() == [8, 3] and found.wrong.tolist() == [9, 4]
    assert found.positions(-1).tolist() == [3, 1]
    assert found.positions(0).tolist() == [0, 0]
    with pytest.raises(ConfigError, match="outside a prompt"):
        found.positions(-3)


def test_command_line_answers_override_the_file_and_broadcast(
    toy: HookedTransformer, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.safetensors"
    save_file(
        {"tokens": torch.tensor([[0, 1, 2], [0, 3, 4]]), "answer": torch.tensor([5, 6])}, str(path)
    )
    found = read_prompts(toy, prompt=None, tokens_file=path, induction=None, wrong=["7"])
    assert found.answers.tolist() == [5, 6] and found.wrong.tolist() == [7, 7]
    found = read_prompts(toy, prompt=None, tokens_file=path, induction=None, answer=["1", "2"])
    assert found.answers.tolist() == [1, 2]
    with pytest.raises(ConfigError, match="given 3 times for 2 prompts"):
        read_prompts(toy, prompt=None, tokens_file=path, induction=None, answer=["1", "2", "3"])
    with pytest.raises(InvalidTokensError, match="outside the vocabulary"):
        read_prompts(toy, prompt=None, tokens_file=path, induction=None, answer=["999"])


def test_text_prompts_and_text_answers_use_the_tokenizer(gpt2: HookedTransformer) -> None:
    found = read_prompts(
        gpt2,
        prompt=["the cat sat on the", "a dog"],
        tokens_file=None,
        induction=None,
        answer=["mat"],
        wrong=["house"],
    )
    bos, mat = gpt2.tokenizer.bos_token_id, gpt2.to_tokens("mat", prepend_bos=False)[0, 0]
    assert found.tokens[0, 0] == bos and found.answers.tolist() == [int(mat)] * 2
    assert found.positions(-1).tolist() == [5, 2]
    with pytest.raises(ConfigError, match="is 2 tokens, not one"):
        read_prompts(gpt2, prompt=["the"], tokens_file=None, induction=None, answer=["big red"])


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ({}, ConfigError, "give exactly one input"),
        ({"induction": 3, "prompt": ["x"]}, ConfigError, "got prompt, induction"),
        ({"induction": 40}, ConfigError, "use at most 31"),
        ({"tokens_file": Path("/no/such.jsonl")}, FileNotFoundError, "does not exist"),
        ({"prompt": ["the cat"]}, NoTokenizerError, "no tokenizer"),
    ],
)
def test_bad_inputs_name_the_problem(
    toy: HookedTransformer, given: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        prompts_from(toy, **given)


def test_bad_token_files(toy: HookedTransformer, tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("[0, 1]\n{oops\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not JSON"):
        prompts_from(toy, tokens_file=bad_json)
    floats = tmp_path / "floats.safetensors"
    save_file({"tokens": torch.zeros(2, 3)}, str(floats))
    with pytest.raises(InvalidTokensError, match="integer"):
        prompts_from(toy, tokens_file=floats)
    unnamed = tmp_path / "unnamed.safetensors"
    save_file({"ids": torch.zeros(2, 3, dtype=torch.long)}, str(unnamed))
    with pytest.raises(ConfigError, match="no 'tokens' tensor"):
        prompts_from(toy, tokens_file=unnamed)


def test_token_matrix_for_training(toy: HookedTransformer, tmp_path: Path) -> None:
    synthetic = read_token_matrix(toy, tokens_file=None, induction=4, n_sequences=6)
    assert isinstance(synthetic, torch.Tensor) and synthetic.shape == (6, 9)
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text("[0, 1, 2]\n[0, 1]\n")
    with pytest.raises(ConfigError, match="differ in length"):
        read_token_matrix(toy, tokens_file=ragged, induction=None)
    assert read_token_matrix(toy, tokens_file=tmp_path, induction=None) == tmp_path
