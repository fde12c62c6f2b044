"""Reading a user's input files as text: every failure names the file (and line) it is in.

Spec files, pairs files and token files go through ``read_text``, so a missing or
unreadable file, a directory, binary garbage and non-UTF-8 bytes are one
``InputFileError`` (or ``FileNotFoundError``) with the path, never a traceback
from deep in a parser. ``short_repr`` keeps the values quoted in messages short,
however large or deeply nested (a YAML alias bomb) they are.
"""

from __future__ import annotations

from pathlib import Path
import reprlib
from typing import Any

from mitk.errors import InputFileError

MAX_TEXT_BYTES = 1 << 30
"""Largest input text file read whole (1 GiB): more is not a spec or a list of prompts."""

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, in time bounded by the cut."""
    return _SHORT.repr(value)


def read_text(path: Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the ``what`` file at ``path`` (a leading byte-order mark dropped).

    ``FileNotFoundError`` if it does not exist; ``InputFileError`` naming the file
    (and the line) for a directory, an unreadable or oversized file, bytes that are
    not UTF-8, or a NUL byte (a binary file).
    """
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory; expected a {what}")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputFileError(f"{path}: {size:,} bytes is too large for a {what} "
                                 f"(at most {max_bytes:,})")  # fmt: skip
        data = path.read_bytes()
    except OSError as err:
        raise InputFileError(f"{path}: cannot read the {what}: {err.strerror or err}") from err
    return decode(data, path, what)


def decode(data: bytes, path: Path | str, what: str, line: int | None = None) -> str:
    """``data`` as UTF-8 text; ``InputFileError`` naming the line of the first bad or NUL byte.

    ``line`` is the line number of ``data`` when it is one line of a larger file.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        at = line if line is not None else data.count(b"\n", 0, err.start) + 1
        raise InputFileError(
            f"{path}:{at}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
            f"a {what} must be a UTF-8 text file"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        at = line if line is not None else text.count("\n", 0, nul) + 1
        raise InputFileError(f"{path}:{at}: holds a NUL byte: a binary file, not a {what}")
    return text
