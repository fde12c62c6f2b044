"""Output targets are checked, and locked, before a command loads a model or computes.

Every command calls these on each output option first, so a bad ``--out`` (a file
where a folder belongs, a folder where a file belongs, a parent that is a file or
is not writable) is exit 2 in a second, not a traceback after an hour of work.
Writability is probed by creating a temporary file, the one test that also holds
for root and for read-only filesystems.
"""

from __future__ import annotations

from pathlib import Path
import tempfile

import typer

from mitk.cli.lock import output_lock
from mitk.cli.settings import SETTINGS
from mitk.errors import OutputPathError


def check_output_file(path: Path | None, option: str) -> None:
    """``OutputPathError`` unless a file can be written at ``path`` (None: not asked for)."""
    if path is None:
        return
    try:
        if path.is_dir():
            raise OutputPathError(f"{option} {path}: is a folder; give a file path")
        _check_parent(path, option)
    except OSError as err:  # e.g. a name too long for the filesystem
        raise OutputPathError(f"{option} {path}: unusable path ({err.strerror or err})") from err


def check_output_dir(path: Path | None, option: str) -> None:
    """``OutputPathError`` unless ``path`` is, or can be created as, a writable folder."""
    if path is None:
        return
    try:
        if path.exists() and not path.is_dir():
            raise OutputPathError(f"{option} {path}: is a file; give a folder")
        if path.is_dir():
            _probe(path, option, path)
        else:
            _check_parent(path, option)
    except OSError as err:
        raise OutputPathError(f"{option} {path}: unusable path ({err.strerror or err})") from err


def hold_output_lock(ctx: typer.Context, path: Path, option: str, name: str = "") -> None:
    """Lock ``path`` while the command of ``ctx`` runs (released when it ends, even on error).

    ``OutputLockedError`` naming the holder when another run has it, after waiting
    ``mitk --lock-wait SECONDS`` if given.
    """
    lock = output_lock(path, option, name, SETTINGS.lock_wait_seconds)
    ctx.with_resource(lock)


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, so nothing can go under it")
    _probe(ancestor, option, path)


def _probe(folder: Path, option: str, path: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mitk-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputPathError(f"{option} {path}: cannot write in {folder} ({reason})") from None
