"""Atomic file writes for dashboards and images: readers see the old file or the whole new one."""

from __future__ import annotations

import os
from pathlib import Path
import tempfile


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, then ``os.replace`` it; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
