"""One run per output: an exclusive lock file beside each output a command writes into.

Two ``mitk patch --out OUT`` runs (or two ``sae train`` runs sharing a checkpoint
folder) would interleave their files. The lock is ``fcntl.flock`` on a small file
next to the target (``.OUT.lock``; shards of one sweep each lock their own, so they
still run side by side). The kernel drops a flock when its process dies, even by
``kill -9``, so a crashed run never blocks the next one: the file it left names a
process that no longer holds it, and the next run takes it over with a warning.
The file records pid, host, start time and command line, so a refusal says who
holds the lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
import fcntl
import json
import os
from pathlib import Path
import socket
import sys
import time
from typing import Any

import typer

from mitk.errors import OutputLockedError, OutputPathError

POLL_SECONDS = 0.2


def lock_path(target: Path, name: str = "") -> Path:
    """The lock file of ``target``: hidden, beside it (``name`` tells shards apart).

    The path is resolved first, so ``.`` and a symlink to the same folder share one lock.
    """
    target = target.resolve()
    suffix = f".{name}" if name else ""
    return target.parent / f".{target.name}{suffix}.lock"


@contextmanager
def output_lock(
    target: Path, option: str = "output", name: str = "", wait_seconds: float = 0.0
) -> Iterator[Path]:
    """Hold the lock of ``target`` for the ``with`` block; the lock file's path.

    Another live holder: wait up to ``wait_seconds``, then ``OutputLockedError``
    naming its pid, host, start time and command. The lock file is removed on exit.
    """
    path = lock_path(target, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target, option, time.monotonic() + wait_seconds)
    except OSError as err:
        raise OutputPathError(
            f"{option} {target}: cannot create its lock file {path} ({err.strerror or err})"
        ) from err
    try:
        previous = _holder(fd)
        if previous:  # its process ended without removing the file: killed, or crashed
            typer.echo(f"warning: {option} {target}: taking over the lock left by "
                       f"{_describe(previous)}, which is no longer running", err=True)  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        yield path
    finally:
        with suppress(OSError):  # unlinked while still held: waiters retry on a fresh file
            path.unlink()
        os.close(fd)


def _acquire(path: Path, target: Path, option: str, deadline: float) -> int:
    """An open descriptor holding the flock of ``path`` (the file still at ``path``)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise OutputLockedError(
                    f"{option} {target} is in use by {_describe(holder)}; wait for it to "
                    "finish, or run `mitk --lock-wait SECONDS ...` to wait for the lock"
                ) from None
            time.sleep(POLL_SECONDS)
            continue
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder removed this file as it let go: lock the new one


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder ({} if empty or unreadable)."""
    try:
        found = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    where = f"pid {holder.get('pid')} on {holder.get('host')}"
    started = f", started {holder['started']}" if "started" in holder else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"{where}{started}{command}"


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["mitk", *sys.argv[1:]])[:300],
    }
