"""Atomic file writes for dashboards and images: readers see the old file or the whole new one."""

from __future__ import annotations

from pathlib import Path

from mitk.atomic import atomic_write_bytes


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with ``mitk.atomic.atomic_write_bytes``; returns the path."""
    return atomic_write_bytes(path, data)
