"""The ``shakespeare-small`` recipe at a tiny size: trains, saves, writes its card, resumes.

Needs the ``shakespeare`` package (the texts; the test extra installs it).
"""

from __future__ import annotations

from dataclasses import replace
import json
from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.train import shakespeare_small
from mitk.train.loop import BatchFn
from mitk.train.shakespeare_card import CARD_JSON, CARD_MD
from mitk.train.shakespeare_corpus import CorpusMissingError, Split, load_split

TINY = replace(
    shakespeare_small.MODEL, d_model=32, d_head=8, rotary_dim=8, d_mlp=64, n_layers=2, d_vocab=300
)
TRAIN = replace(shakespeare_small.TRAIN, steps=6, warmup=2, checkpoint_every=2, log_every=1)


@pytest.fixture(scope="module")
def small_split() -> Split:
    """The real split, each text cut short: the same code paths in seconds."""
    try:
        split = load_split()
    except CorpusMissingError as err:
        pytest.skip(f"the recipe needs the shakespeare package: {err}")
    return Split(
        train={name: text[:20_000] for name, text in list(split.train.items())[:4]},
        held_out={
            group: {name: text[:4_000] for name, text in texts.items()}
            for group, texts in split.held_out.items()
        },
    )


def build(
    split: Split, out: Path, checkpoints: Path | None = None, resume: bool = False
) -> HookedTransformer:
    return shakespeare_small.build(
        out,
        checkpoints,
        resume,
        TINY,
        TRAIN,
        batch=2,
        repeated=1,
        copy_steps=2,
        progress=False,
        split=split,
    )  # the kill at step 3 falls in the text steps, after the copy steps


class KilledError(Exception):
    """Where the run is killed."""


def test_recipe_trains_saves_writes_the_card_and_resumes_bit_identically(
    small_split: Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = build(small_split, tmp_path / "straight")
    saved = tmp_path / "straight"
    assert {"model.safetensors", "mitk_config.json", "tokenizer.json", CARD_JSON, CARD_MD} <= {
        p.name for p in saved.iterdir()
    }
    card = json.loads((saved / CARD_JSON).read_text())
    assert card["run"]["steps"] == TRAIN.steps and card["model"]["config"]["d_model"] == 32
    assert "bigram" in (saved / CARD_MD).read_text()
    loaded = HookedTransformer.from_pretrained(saved)
    assert loaded.W_E.dtype == torch.float32 and loaded.tokenizer is not None

    real_batch_fn = shakespeare_small.batch_fn

    def dies_at_step_3(*args: object) -> BatchFn:
        batches = real_batch_fn(*args)  # type: ignore[arg-type]

        def at(step: int) -> torch.Tensor:
            if step == 3:
                raise KilledError
            return batches(step)

        return at

    monkeypatch.setattr(shakespeare_small, "batch_fn", dies_at_step_3)
    with pytest.raises(KilledError):
        build(small_split, tmp_path / "resumed", tmp_path / "ckpt")
    monkeypatch.setattr(shakespeare_small, "batch_fn", real_batch_fn)
    resumed = build(small_split, tmp_path / "resumed", tmp_path / "ckpt", resume=True)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_batches_copy_first_then_text_with_repeated_passages_first() -> None:
    stream = torch.arange(10, 2_000)
    batches = shakespeare_small.batch_fn(
        stream, batch=4, seq_len=17, bos=0, seed=0, repeated=1, copy_ids=(3, 300),
        copy_steps=2, repeat_lengths=(8, 9),
    )  # fmt: skip
    copies = batches(1)
    assert copies.shape == (shakespeare_small.COPY_SHAPE[0], 17) and (copies[:, 0] == 0).all()
    assert copies[:, 1:].min() >= 3 and copies[:, 1:].max() < 300
    for row in copies[:, 1:]:  # one segment repeated: some period p has row[p:] == row[:-p]
        assert any(torch.equal(row[p:], row[:-p]) for p in range(4, 9))
    rows = batches(5)
    assert rows.shape == (4, 17)
    assert torch.equal(rows, batches(5)) and not torch.equal(rows, batches(6))
    assert (rows[:, 0] == 0).all()
    assert torch.equal(rows[0, 9:], rows[0, 1:9])  # BOS, an 8-token passage, the same again
    assert (rows[0, 2:9] - rows[0, 1:8] == 1).all()  # ... which is a passage of the stream
    assert (rows[1:, 2:] - rows[1:, 1:-1] == 1).all()  # the others: plain windows of the text
