"""Prompt pairs for sweeps: files, text, errors naming file, line and field; batches; chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.errors import ConfigError, InputFileError
from mitk.sweeps import (
    ChunkStore,
    IncompleteSweepError,
    PairsError,
    SweepSpec,
    Vocabulary,
    prepare,
    read_pairs,
)
from mitk.sweeps.batch import batch_pairs
from mitk.sweeps.pairs import check_pairs
from mitk.sweeps.runner import run_unit
from mitk.sweeps.units import plan_units
from tests.checkpoints import word_tokenizer

VOCAB = Vocabulary(d_vocab=50, n_ctx=16)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(clean: object = (1, 2, 3), corrupted: object = (1, 4, 3), **extra: object) -> dict:
    as_ids = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {
        "clean": as_ids(clean),
        "corrupted": as_ids(corrupted),
        "answer": 5,
        "wrong_answer": 6,
        **extra,
    }


def test_jsonl_and_csv_give_the_same_pairs(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "p.jsonl", [row(), row((7, 8, 9), (7, 8, 1))])
    csv = tmp_path / "p.csv"
    csv.write_text('clean,corrupted,answer,wrong_answer\n1 2 3,1 4 3,5,6\n"[7, 8, 9]",7 8 1,5,6\n')
    from_jsonl = read_pairs(jsonl, VOCAB, "logit_diff", "none")
    from_csv = read_pairs(csv, VOCAB, "logit_diff", "none")
    assert [(p.clean, p.corrupted, p.answer, p.wrong) for p in from_jsonl] == [
        (p.clean, p.corrupted, p.answer, p.wrong) for p in from_csv
    ]
    assert from_jsonl[1].where == f"{jsonl}:2" and from_csv[1].where == f"{csv}:3"


def test_text_pairs_use_the_tokenizer(tmp_path: Path) -> None:
    vocab = Vocabulary(d_vocab=20, n_ctx=16, tokenizer=word_tokenizer(), prepend_bos=True)
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {
                "clean": "the cat sat on the",
                "answer": "mat",
                "corrupted": "the dog sat on the",
                "wrong_answer": "cat",
            }
        ],
    )
    (pair,) = read_pairs(path, vocab, "logit_diff", "none")
    assert pair.clean[0] == 0 and len(pair.clean) == 6  # BOS + five words
    assert pair.answer == word_tokenizer().convert_tokens_to_ids("mat")
    path.write_text(
        json.dumps(
            {"clean": "the cat", "corrupted": "the dog", "answer": "big red", "wrong_answer": "cat"}
        )
    )
    with pytest.raises(PairsError, match=r"t.jsonl:1: field 'answer': 'big red' is 2 tokens"):
        read_pairs(path, vocab, "logit_diff", "none")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row(), "{not json"], r"p.jsonl:2: not valid JSON"),
        (
            [row(), row(corrupted=(1, 99, 3))],
            r"p.jsonl:2: field 'corrupted': token id 99 at position 1 "
            r"is outside the vocabulary \[0, 50\)",
        ),
        (
            [row(), {"clean": [1], "corrupted": [2], "answer": 3}],
            r"p.jsonl:2: field 'wrong_answer' is missing",
        ),
        (
            [{"clean": [1], "corrupted": [2], "answer": 3, "wrong": 4}],
            r"did you mean 'wrong_answer'",
        ),
        (
            [row(clean=(1, 2, 3, 4))],
            r"p.jsonl:1: field 'corrupted': 3 tokens but 'clean' has 4; set align",
        ),
        ([row(), row((1, 2), (1, 3))], r"p.jsonl:2: field 'clean': 2 tokens but .*p.jsonl:1 has 3"),
        (
            [row(clean="the cat")],
            r"p.jsonl:1: field 'clean': text 'the cat' needs a model with a tokenizer",
        ),
        (
            [row(clean=list(range(17)), corrupted=list(range(17)))],
            r"more than the model's n_ctx=16",
        ),
        ([row(answer=True)], r"field 'answer': expected one token id"),
        (["[1, 2]"], r"p.jsonl:1: a pair is an object"),
    ],
)
def test_bad_pairs_name_file_line_and_field(tmp_path: Path, rows: list, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with pytest.raises(PairsError, match=message):
        read_pairs(path, VOCAB, "logit_diff", "none")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.jsonl", b'{"clean": [1]}\n\xff\xfe\n', r"p.jsonl:2: not UTF-8 text \(byte 0xff\)"),
        ("p.jsonl", b"\x00\x01\x02", r"p.jsonl:1: holds a NUL byte: a binary file"),
        ("p.csv", b"clean,corrupted\n\x00", r"p.csv:2: holds a NUL byte"),
        ("p.jsonl", b"[" * 100_000 + b"\n", r"p.jsonl:1: nested too deeply"),
        (
            "p.jsonl",
            b'{"clean": [' + b"9" * 5000 + b"]}\n",
            r"p.jsonl:1: not usable as a prompt pair",
        ),
        ("p.jsonl", b'{"clean": "1 2", "corrupted": [1, -3]}\n', r"position 1 is outside"),
        ("p.txt", b"", r"p.txt: pairs files are .jsonl or .csv"),
    ],
)
def test_unreadable_pairs_files_name_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message):  # PairsError is one
        check_pairs(path, "kl_to_clean" if "answer" not in message else "prob")
    with pytest.raises(InputFileError, match=message):
        read_pairs(path, VOCAB, "kl_to_clean" if "answer" not in message else "prob", "none")


def test_pairs_are_checked_without_the_model(tmp_path: Path) -> None:
    # text and large ids wait for the tokenizer and vocabulary; shape and types do not
    path = write_jsonl(tmp_path / "p.jsonl", [row(clean="the cat"), row(clean=(1, 2, 999))])
    assert check_pairs(path, "logit_diff") == 2
    inline = [{"clean": [1, 2], "corrupted": [1, 2], "answer": "x", "wrong_answer": [3.5]}]
    with pytest.raises(PairsError, match=r"spec.yaml:4: pairs\[0\]: field 'wrong_answer'"):
        check_pairs(inline, "logit_diff", where="spec.yaml:4: ")
    digits = tmp_path / "p.csv"  # '²' is a digit to str.isdigit, but no token id
    digits.write_text("clean,corrupted,answer\n1 2,1 3,\u00b2\n")
    with pytest.raises(PairsError, match=r"p.csv:2: field 'answer': text '\u00b2' needs a model"):
        read_pairs(digits, VOCAB, "prob", "none")


def test_metric_decides_which_answers_are_needed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"clean": [1, 2], "corrupted": [1, 3]}])
    assert read_pairs(path, VOCAB, "kl_to_clean", "none")[0].answer is None
    with pytest.raises(PairsError, match="field 'answer' is missing; metric prob needs"):
        read_pairs(path, VOCAB, "prob", "none")


def test_padding_rules_line_prompts_up() -> None:
    rows = [row((1, 2, 3, 4), (1, 2, 5)), row((1, 2), (1, 3))]
    with pytest.raises(PairsError, match="right-pad keeps answer positions apart"):
        read_pairs(rows, VOCAB, "logit_diff", "right-pad")
    left = batch_pairs(read_pairs(rows, VOCAB, "logit_diff", "left-pad"), "left-pad", pad_id=0)
    assert left.clean.tolist() == [[1, 2, 3, 4], [0, 0, 1, 2]]
    assert left.corrupted.tolist() == [[0, 1, 2, 5], [0, 0, 1, 3]]  # shorter prompt: visible fill
    assert left.mask is not None and left.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert left.answer_pos.tolist() == [3, 3]
    rows = [row((1, 2, 3), (1, 4, 3)), row((1, 2), (1, 3))]
    right = batch_pairs(read_pairs(rows, VOCAB, "logit_diff", "right-pad"), "right-pad", pad_id=0)
    assert right.mask is not None and right.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right.answer_pos.tolist() == [2, 1]


def test_a_padded_unit_equals_each_pair_patched_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = (9, 6, 7)
    pairs = []
    for n in lengths:
        clean = torch.randint(1, 256, (n,), generator=gen).tolist()
        corrupted = [clean[0], (clean[1] + 7) % 256, *clean[2:]]
        pairs.append({"clean": clean, "corrupted": corrupted, "answer": 3, "wrong_answer": 4})
    sweep = prepare(
        SweepSpec.from_dict(
            {"pairs": pairs, "sites": ["z:head"], "align": "right-pad", "batch_size": 3}
        )
    )
    frame = run_unit(sweep, sweep.units[0])
    model = HookedTransformer.from_pretrained("toy-induction")
    for index, pair in enumerate(pairs):
        alone = activation_patch(
            model,
            torch.tensor([pair["clean"]]),
            torch.tensor([pair["corrupted"]]),
            logit_diff(3, 4),
            "z",
            "head",
        )
        rows = frame[frame["pair"] == index].sort_values(["layer", "head"])
        torch.testing.assert_close(
            torch.tensor(rows["value"].to_numpy()),
            alone.per_prompt[0].reshape(-1).double(),
            atol=1e-5,
            rtol=0,
        )
        assert rows["clean"].iloc[0] == pytest.approx(float(alone.clean[0]), abs=1e-5)


def test_chunks_merge_each_row_once_and_refuse_another_spec(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    assert store.claim("abc", {"n_units": 2}) is False
    assert store.claim("abc", {"n_units": 2}) is True
    with pytest.raises(ConfigError, match="holds a different sweep"):
        store.claim("xyz", {"n_units": 2})
    units = plan_units(2, 1, [("z", "head")])
    frame = pd.DataFrame(
        {
            "unit": [0],
            "pair": [0],
            "site": ["z"],
            "per": ["head"],
            "layer": [0],
            "pos": pd.array([None], dtype="Int64"),
            "head": pd.array([1], dtype="Int64"),
        }
    )
    store.write(units[0], frame)
    with pytest.raises(IncompleteSweepError, match="1 of 2 units have no chunk yet"):
        store.merge(2)
    store.write(units[1], frame.assign(unit=1))  # the same row again, as a buggy split would
    with pytest.raises(RuntimeError, match="more than once"):
        store.merge(2)
    assert not list(tmp_path.glob("chunks/.*.tmp"))


def test_an_unknown_model_fails_before_any_work() -> None:
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        prepare(SweepSpec.from_dict({"model": "no-such-model", "pairs": [row()]}))
