"""Prompt pairs for a sweep: read inline, from JSONL or from CSV, and checked before any work.

Each pair has ``clean`` and ``corrupted`` prompts, an ``answer`` and, for
``logit_diff``, a ``wrong_answer``. A prompt is a list of token ids (a JSON
list, or whitespace-separated integers in a CSV cell) or, when the model has a
tokenizer, text; an answer is one token id or text that is exactly one token.
Every error names the file, the line (or inline entry) and the field.
"""

from __future__ import annotations

from collections.abc import Iterator
import csv
from dataclasses import dataclass
import difflib
import hashlib
import io
import json
from pathlib import Path
import re
import sys
from typing import Any

from mitk.errors import InputFileError
from mitk.sweeps.reading import read_text, short_repr

FIELDS = ("clean", "corrupted", "answer", "wrong_answer")
_IDS = re.compile(r"^\s*\d+(\s+\d+)*\s*$", re.ASCII)
_ID = re.compile(r"^\s*\d+\s*$", re.ASCII)


class PairsError(InputFileError):
    """A prompt pair cannot be used: malformed, out of the vocabulary, or misaligned."""


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupted pair as token ids; ``where`` is ``file:line`` or ``pairs[i]``."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    answer: int | None
    wrong: int | None
    where: str


@dataclass(frozen=True)
class Vocabulary:
    """What checking and tokenizing prompts needs from the model."""

    d_vocab: int
    n_ctx: int
    tokenizer: Any = None  # a Hugging Face tokenizer, or None: token ids only
    prepend_bos: bool = True  # for text prompts, as the model's own ``tokenize`` does

    @property
    def pad_id(self) -> int:
        """Token id that fills padding (masked) and the gap left-pad leaves in a shorter prompt."""
        pad = None if self.tokenizer is None else self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)


def read_pairs(
    source: Path | list[dict[str, Any]], vocab: Vocabulary, metric: str, align: str
) -> list[PromptPair]:
    """Every pair of a JSONL/CSV file or an inline list, checked against the model and metric.

    ``PairsError`` (naming file, line and field) for malformed rows, token ids
    outside ``[0, d_vocab)``, prompts longer than ``n_ctx``, a missing answer
    the metric needs, or prompt lengths that ``align`` cannot line up.
    """
    rows = _inline_rows(source) if isinstance(source, list) else _file_rows(source)
    pairs = [_parse_row(where, row, vocab, metric) for where, row in rows]
    if not pairs:
        raise PairsError(f"{source if isinstance(source, Path) else 'pairs'}: no prompt pairs")
    _check_alignment(pairs, align)
    return pairs


def check_pairs(source: Path | list[dict[str, Any]], metric: str, where: str = "") -> int:
    """Check what can be checked without the model; the number of pairs.

    The same ``PairsError`` as ``read_pairs`` for unreadable files, malformed rows,
    missing fields and values of the wrong type, so a bad file is refused before a
    model loads. Token ids against the vocabulary, text (which needs the
    tokenizer) and alignment are left to ``read_pairs``. ``where`` prefixes the
    place of inline pairs (e.g. the spec file they sit in).
    """
    rows = _inline_rows(source, where) if isinstance(source, list) else _file_rows(source)
    count = 0
    for place, row in rows:
        _parse_row(place, row, None, metric)
        count += 1
    if not count:
        raise PairsError(f"{source if isinstance(source, Path) else 'pairs'}: no prompt pairs")
    return count


def pairs_digest(pairs: list[PromptPair]) -> str:
    """Hash of the pairs' token ids and answers (not of where they were read from)."""
    blob = json.dumps([[p.clean, p.corrupted, p.answer, p.wrong] for p in pairs])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _inline_rows(entries: list[dict[str, Any]], where: str = "") -> Iterator[tuple[str, Any]]:
    for index, entry in enumerate(entries):
        yield f"{where}pairs[{index}]", entry


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        raise PairsError(f"{path}: pairs files are .jsonl or .csv, not {suffix or 'no suffix'!r}")
    text = read_text(path, "pairs file")
    if suffix in (".csv", ".tsv"):
        yield from _csv_rows(text, path, "\t" if suffix == ".tsv" else ",")
    else:
        yield from _jsonl_rows(text, path)


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        yield where, _json_value(line, where, "a prompt pair")


def _csv_rows(text: str, path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        missing = [f for f in ("clean", "corrupted") if f not in (reader.fieldnames or [])]
        if missing:
            raise PairsError(
                f"{path}:1: header lacks column(s) {', '.join(missing)}; "
                f"expected {', '.join(FIELDS)}"
            )
        start = reader.line_num + 1
        for row in reader:
            # a CSV cell may not be empty-as-missing: drop empty optional cells
            yield f"{path}:{start}", {k: v for k, v in row.items() if v not in (None, "")}
            start = reader.line_num + 1
    except csv.Error as err:
        raise PairsError(f"{path}:{reader.line_num}: not valid CSV ({err})") from err


def _parse_row(where: str, row: Any, vocab: Vocabulary | None, metric: str) -> PromptPair:
    """One row as a pair; with no ``vocab``, only its shape and types are checked."""
    if not isinstance(row, dict):
        raise PairsError(
            f"{where}: a pair is an object with fields {', '.join(FIELDS)}, got {short_repr(row)}"
        )
    needed = ["clean", "corrupted"]
    needed += [] if metric == "kl_to_clean" else ["answer"]
    needed += ["wrong_answer"] if metric == "logit_diff" else []
    for name in needed:
        if name not in row:
            close = difflib.get_close_matches(name, [str(k) for k in row], n=1, cutoff=0.6)
            hint = f" (found {close[0]!r}: did you mean {name!r}?)" if close else ""
            raise PairsError(
                f"{where}: field {name!r} is missing; metric {metric} needs "
                f"{', '.join(needed)}{hint}"
            )
    clean = _prompt(row["clean"], f"{where}: field 'clean'", vocab)
    corrupted = _prompt(row["corrupted"], f"{where}: field 'corrupted'", vocab)
    answer = _answer(row.get("answer"), f"{where}: field 'answer'", vocab)
    wrong = _answer(row.get("wrong_answer"), f"{where}: field 'wrong_answer'", vocab)
    return PromptPair(clean, corrupted, answer, wrong, where)


def _json_value(text: str, where: str, what: str) -> Any:
    """``json.loads(text)``, every way it can fail a ``PairsError`` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PairsError(
            f"{where}: not valid JSON for {what} ({err.msg}, column {err.colno})"
        ) from err
    except RecursionError:
        raise PairsError(f"{where}: nested too deeply to be {what}") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise PairsError(f"{where}: not usable as {what} ({err})") from err


def _prompt(value: Any, where: str, vocab: Vocabulary | None) -> tuple[int, ...]:
    if isinstance(value, str) and value.strip().startswith("["):
        value = _json_value(value, where, "a list of token ids")
    if isinstance(value, str) and _IDS.match(value):
        value = [_token_id(x, where) for x in value.split()]
    if isinstance(value, str):
        if not value:
            raise PairsError(f"{where}: the prompt is empty")
        if vocab is None:
            return ()  # text: tokenised (and checked) once the model is there
        ids = _encode(value, where, vocab, vocab.prepend_bos)
    elif isinstance(value, list):
        if any(isinstance(x, bool) or not isinstance(x, int) for x in value):
            raise PairsError(f"{where}: token ids must be integers, got {short_repr(value)}")
        ids = list(value)
    else:
        raise PairsError(f"{where}: expected a list of token ids or text, got {short_repr(value)}")
    if not ids:
        raise PairsError(f"{where}: the prompt is empty")
    if vocab is None:
        _check_ids(ids, where, None)
        return tuple(ids)
    if len(ids) > vocab.n_ctx:
        raise PairsError(f"{where}: {len(ids)} tokens, more than the model's n_ctx={vocab.n_ctx}")
    _check_ids(ids, where, vocab)
    return tuple(ids)


def _token_id(text: str, where: str) -> int:
    """An ASCII-digit token id; digit strings longer than any vocabulary are refused as text is."""
    if len(text.strip()) > 12:
        raise PairsError(f"{where}: token id {text.strip()[:20]}... is outside any vocabulary")
    return int(text)


def _answer(value: Any, where: str, vocab: Vocabulary | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and _ID.match(value):
        value = _token_id(value, where)
    if isinstance(value, str):
        if vocab is None:
            return None  # text: one token or not, the tokenizer says
        ids = _encode(value, where, vocab, prepend_bos=False)
        if len(ids) != 1:
            raise PairsError(
                f"{where}: {short_repr(value)} is {len(ids)} tokens; an answer is one token"
            )
        value = ids[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise PairsError(
            f"{where}: expected one token id or one token of text, got {short_repr(value)}"
        )
    _check_ids([value], where, vocab)
    return value


def _encode(text: str, where: str, vocab: Vocabulary, prepend_bos: bool) -> list[int]:
    tok = vocab.tokenizer
    if tok is None:
        raise PairsError(
            f"{where}: text {text!r} needs a model with a tokenizer; "
            "this one takes token ids (a JSON list of integers)"
        )
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if prepend_bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return ids


def _check_ids(ids: list[int], where: str, vocab: Vocabulary | None) -> None:
    """Every id in ``[0, d_vocab)``; without a vocabulary, at least not negative."""
    d_vocab = sys.maxsize if vocab is None else vocab.d_vocab
    for pos, token in enumerate(ids):
        if not 0 <= token < d_vocab:
            shown = short_repr(token)
            bound = f"the vocabulary [0, {d_vocab})" if vocab is not None else "any vocabulary"
            raise PairsError(f"{where}: token id {shown} at position {pos} is outside {bound}")


def _check_alignment(pairs: list[PromptPair], align: str) -> None:
    """Prompts must line up position by position unless ``align`` says how to pad them."""
    first = pairs[0]
    for pair in pairs:
        n_clean, n_corrupted = len(pair.clean), len(pair.corrupted)
        if n_clean != n_corrupted and align != "left-pad":
            fix = (
                "set align: left-pad to end-align them"
                if align == "none"
                else ("right-pad keeps answer positions apart; use left-pad")
            )
            raise PairsError(
                f"{pair.where}: field 'corrupted': {n_corrupted} tokens but "
                f"'clean' has {n_clean}; {fix}"
            )
        if align == "none" and n_clean != len(first.clean):
            raise PairsError(
                f"{pair.where}: field 'clean': {n_clean} tokens but {first.where} "
                f"has {len(first.clean)}; pairs of different lengths need "
                "align: left-pad or right-pad"
            )
