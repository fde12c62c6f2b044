"""Atomic writes, the one way mitk writes a file or a folder: readers see the old or the whole new.

A file is written to a temp file beside its target (same directory, so same
filesystem and ``os.replace`` is a rename), flushed to disk, given mode 0644 and
renamed over the target. A folder is staged beside its target and swapped in;
the old folder is set aside under a fixed name first, so a crash at any point
leaves one complete folder that ``complete_folder`` finds. When the write fails,
``KeyboardInterrupt`` included, the temp file or folder is removed and the
target is untouched.

A process killed outright (SIGKILL, power loss) can leave a hidden ``.NAME.*.tmp``
file or ``.NAME.tmp-*`` folder; it is never mistaken for the target, and
``remove_leftovers`` deletes it on the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
import os
from pathlib import Path
import re
import secrets
import shutil
import tempfile

FILE_MODE = 0o644
"""Files mitk writes are meant to be shared; ``mkstemp`` alone would give 0600."""
FOLDER_MODE = 0o755
"""Likewise for folders (``mkdtemp`` gives 0700)."""
_LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?:[a-z0-9_]{8}\.tmp|tmp-[a-z0-9_]{8})")
"""A temp file or staging folder this module made for ``target`` (mkstemp/mkdtemp: 8 characters)."""


def atomic_write(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Have ``writer`` write a temp file beside ``path``, then rename it over ``path``; the path.

    ``writer`` gets the temp file's path (the file exists, empty) and may reopen
    or recreate it, e.g. ``lambda p: frame.to_parquet(p)``; what it returns is
    ignored. Parent folders are created. If ``writer`` raises, the temp file is
    deleted, the exception propagates and ``path`` keeps its old contents (or
    stays absent).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(name)
    try:
        writer(temp)
        os.chmod(temp, FILE_MODE)
        _sync_file(temp)  # the data is on disk before the rename makes it visible
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)
    return target


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``); the path."""
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded as given, newlines untranslated; the path."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Stage a folder beside ``path``; on a clean exit it replaces ``path`` whole.

    Write the folder's files into the yielded staging folder. If the block
    raises (``KeyboardInterrupt`` included) the staging folder is deleted and
    ``path`` is untouched. An existing ``path`` is replaced whole, whatever it
    holds, so callers check first when it may hold files they did not write.
    ``FileExistsError`` if ``path`` is a file.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staging
        os.chmod(staging, FOLDER_MODE)
        for file in staging.rglob("*"):
            if file.is_file():
                _sync_file(file)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def complete_folder(path: str | Path) -> Path | None:
    """``path`` if it exists, else the old copy a crash mid-swap left aside, else None.

    Readers of folders written by ``atomic_folder`` call this to resume from
    the last complete folder.
    """
    target = Path(path)
    if target.exists():
        return target
    aside = set_aside_path(target)
    return aside if aside.is_dir() else None


def set_aside_path(path: str | Path) -> Path:
    """Where ``atomic_folder`` keeps the old ``path`` while swapping the new one in."""
    target = Path(path)
    return target.parent / f".{target.name}.old"


def discard_folder(path: str | Path) -> None:
    """Delete the folder ``path``: renamed to a temp name first, so a kill midway leaves no
    half-deleted folder under its real name (``remove_leftovers`` finishes the job)."""
    target = Path(path)
    doomed = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    os.replace(target, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def move_folder(source: str | Path, target: str | Path) -> None:
    """Rename the folder ``source`` to ``target``, replacing (discarding) any ``target`` first.

    The rename is made durable before returning. Between the discard and the
    rename neither name holds the old ``target``, so callers move only when
    another complete copy exists elsewhere (a checkpoint's ``latest`` while its
    old ``previous`` goes).
    """
    destination = Path(target)
    if destination.exists():
        discard_folder(destination)
    os.replace(source, destination)
    _sync_folder(destination.parent)


def remove_leftovers(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete what killed atomic writes of each ``folder/NAME`` left beside it; the paths deleted.

    Only names this module gives: ``.NAME.XXXXXXXX.tmp`` temp files,
    ``.NAME.tmp-XXXXXXXX`` staging folders, and a set-aside ``.NAME.old``
    once ``NAME`` is back in place (while ``NAME`` is missing it is the last
    complete copy and stays). The caller names only targets it alone writes,
    so another process's write in progress is never touched.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    wanted = set(names)
    asides = {f".{name}.old" for name in wanted if (root / name).exists()}
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            continue  # never ours, never followed
        temp = _LEFTOVER.fullmatch(entry.name)
        if entry.name in asides or (temp is not None and temp["target"] in wanted):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; at every instant one of the two names is complete."""
    aside = set_aside_path(target)
    if target.exists():
        if aside.exists():  # left by a crash after the swap: target is the newer, complete one
            shutil.rmtree(aside)
        os.replace(target, aside)  # a crash from here on leaves the old folder in `aside`
    # (when target is absent, `aside` may be the last complete copy: it goes only after this)
    os.replace(staging, target)
    _sync_folder(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _sync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sync_folder(path: Path) -> None:
    """Make a rename in ``path`` durable; skipped where folders cannot be opened (Windows)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(handle)
