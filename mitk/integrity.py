"""Content hashes of the files mitk writes, checked before any is trusted again.

Every file a long run will read back (checkpoint tensors and state, sweep chunks
and manifest) has its size and sha256 recorded in a *ledger* when it is
written; a reader verifies it first. A ledger is a small JSON file mapping
file names to records, written in one canonical form (sorted keys, no spaces),
so a change to the ledger's own bytes is caught too: either it no longer
parses, or it is no longer canonical, or a record no longer matches its file.

Files are hashed by streaming them in 1 MiB blocks, never read whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import hashlib
import json
from pathlib import Path
from typing import Any

from mitk.atomic import atomic_write_text
from mitk.errors import MitkError

BLOCK = 1 << 20
"""Bytes hashed at a time."""


class CorruptFileError(MitkError, ValueError):
    """A file is missing, or differs from the size and hash recorded when it was written.

    The message names each such file and what is wrong with it.
    """


class IntegrityWarning(UserWarning):
    """A damaged file was passed over: an older checkpoint is used, or a sweep unit is redone."""


@dataclass(frozen=True)
class FileRecord:
    """What a ledger records of one file: its size in bytes and its sha256 (hex)."""

    size: int
    sha256: str


def record_of(path: Path) -> FileRecord:
    """The size and sha256 of the file at ``path``, hashed in blocks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
            size += len(block)
    return FileRecord(size, digest.hexdigest())


def damage(path: Path, record: FileRecord | None) -> str | None:
    """What is wrong with ``path`` against its ``record``, in words; None when it matches."""
    if record is None:
        return "no hash was recorded for it"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0 and record.size > 0:
        return f"empty ({record.size} bytes were written)"
    if size < record.size:
        return f"truncated ({size} of the {record.size} bytes written)"
    if size > record.size:
        return f"longer than written ({size} bytes, {record.size} were written)"
    if record_of(path).sha256 != record.sha256:
        return "bytes changed in place (same size, sha256 differs from the one recorded)"
    return None


def write_ledger(ledger: Path, files: Mapping[str, Path]) -> Path:
    """Record each file's size and sha256 under its name in ``ledger`` (written atomically).

    ``files`` maps the names readers will look the files up by to where they
    are now (a temp file about to be renamed is fine).
    """
    records = {name: _as_json(record_of(path)) for name, path in files.items()}
    return atomic_write_text(ledger, _canonical({"sha256": records}))


def read_ledger(ledger: Path) -> dict[str, FileRecord]:
    """The records in ``ledger``; ``CorruptFileError`` naming it if it is missing or damaged."""
    if not ledger.is_file():
        raise CorruptFileError(f"{ledger}: missing (it records the hashes of the files beside it)")
    raw = ledger.read_bytes()
    try:
        content = json.loads(raw.decode("utf-8"))
        records = {name: _from_json(entry) for name, entry in content["sha256"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        reason = "empty" if not raw else "not a ledger mitk wrote (unreadable JSON or fields)"
        raise CorruptFileError(f"{ledger}: {reason}") from None
    if _canonical(content).encode() != raw:
        raise CorruptFileError(f"{ledger}: edited or damaged (not in the form mitk writes)")
    return records


def verify(ledger: Path, files: Mapping[str, Path]) -> None:
    """Check every file in ``files`` against its record in ``ledger``.

    ``CorruptFileError`` naming each file that is missing or differs (or the
    ledger itself), and what is wrong with it.
    """
    records = read_ledger(ledger)
    problems = [
        f"{path}: {found}"
        for name, path in files.items()
        if (found := damage(path, records.get(name))) is not None
    ]
    if problems:
        raise CorruptFileError(f"{'; '.join(problems)} (checked against {ledger})")


def _as_json(record: FileRecord) -> dict[str, Any]:
    return {"size": record.size, "sha256": record.sha256}


def _from_json(entry: dict[str, Any]) -> FileRecord:
    size, sha256 = entry["size"], entry["sha256"]
    if type(size) is not int or size < 0 or not isinstance(sha256, str) or len(sha256) != 64:
        raise ValueError(entry)
    return FileRecord(size, sha256)


def _canonical(content: Any) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
