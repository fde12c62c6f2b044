"""Ways a file on disk gets damaged, for the tests that check mitk notices each one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def truncate(path: Path) -> None:
    """Keep the first half of the file, as a write cut short would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    """Leave the file in place with no bytes."""
    path.write_bytes(b"")


def flip(path: Path) -> None:
    """Invert three bytes in the middle; the size stays the same."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for offset in range(middle, min(middle + 3, len(data))):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    """Remove the file."""
    path.unlink()


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncate": truncate,
    "empty": empty,
    "flip": flip,
    "delete": delete,
}
"""Each damage, by name."""

SYMPTOMS = {
    "truncate": "truncated",
    "empty": "empty",
    "flip": "bytes changed in place",
    "delete": "missing",
}
"""What the warning or error says about a data file so damaged."""

LEDGER_SYMPTOMS = {**SYMPTOMS, "truncate": "not a ledger", "flip": "not a ledger"}
"""The same for a ledger (the JSON of hashes), whose cut or flipped bytes no longer parse."""
