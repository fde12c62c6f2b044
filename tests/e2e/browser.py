"""Headless Chromium for end-to-end tests: install it if absent, render a page, read a PNG.

Chromium runs from its command line (``--dump-dom``, ``--screenshot``) rather than through
chromedriver: one process per picture, no port, no session to clean up, and a page whose
plots draw when its scripts run needs nothing more than ``--virtual-time-budget`` to settle.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
import re
import shutil
import struct
import subprocess
import tempfile
import zlib

import numpy as np

PACKAGES = ("chromium", "chromium-driver")
CHROMIUM = Path("/usr/bin/chromium")
# The flags the machine notes say a closed network needs (without them Chromium keeps
# dialling Google), plus a resolver that fails every host name: a page that needed the
# network would render without its plots, and the tests would see it.
FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


class NoBrowserError(RuntimeError):
    """Chromium is not installed and could not be installed."""


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def ensure_chromium() -> Path:
    """Path of the Chromium binary, installing Debian's packages with apt-get when absent.

    Raises ``NoBrowserError`` with apt's own words when that is impossible (not root,
    no apt, no registry): callers should fail on it, not skip.
    """
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise NoBrowserError(
            f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
            f"run `apt-get install -y --no-install-recommends {' '.join(PACKAGES)}`"
        )
    install = ("install", "-y", "--no-install-recommends", *PACKAGES)
    done = _apt(*install, timeout=900)
    if done.returncode != 0:  # on a fresh machine the package lists may be missing or stale
        updated = _apt("update", timeout=300)
        done = _apt(*install, timeout=900) if updated.returncode == 0 else updated
    if done.returncode != 0 or not CHROMIUM.exists():
        raise NoBrowserError(
            f"installing {' '.join(PACKAGES)} failed (exit {done.returncode}):\n"
            f"{done.stderr[-2000:]}"
        )
    return CHROMIUM


@dataclass(frozen=True)
class RenderResult:
    """What a person would get: the DOM after the page's scripts ran, and a screenshot."""

    dom: str
    screenshot: Path


def _chromium(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # a fresh profile each run: no state from earlier runs, nothing left in $HOME
    with tempfile.TemporaryDirectory(prefix="mitk-chromium-") as profile:
        done = subprocess.run(
            [str(ensure_chromium()), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


# Appended to a copy of the page for the DOM pass: records the laid-out height once the
# page's own load handlers (plotly's drawing) have run, so the screenshot can show it all.
_MEASURE = (
    "<script>addEventListener('load', () => setTimeout(() => document.documentElement"
    ".setAttribute('data-mitk-height', document.documentElement.scrollHeight), 0));</script>"
)
MAX_HEIGHT = 16384  # Chromium's largest screenshot


def render(
    html_path: Path,
    out_png: Path,
    *,
    width: int = 1280,
    height: int | None = None,
    budget_ms: int = 5000,
    timeout: float = 120,
) -> RenderResult:
    """Load ``html_path`` in headless Chromium; return its DOM and a screenshot ``width`` wide.

    ``height=None`` shoots the whole page (up to ``MAX_HEIGHT``); a number shoots that much
    of it. ``budget_ms`` of virtual time lets timers and promises (plotly's drawing) finish.
    The DOM carries one extra ``<script>`` and ``data-mitk-height`` attribute (the measure).
    """
    if not html_path.is_file():  # Chromium would happily screenshot its own error page
        raise FileNotFoundError(html_path)
    budget, url = f"--virtual-time-budget={budget_ms}", html_path.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="mitk-page-", dir=html_path.parent) as where:
        copy = Path(where) / html_path.name  # beside the original: relative links still work
        copy.write_text(html_path.read_text(encoding="utf-8") + _MEASURE, encoding="utf-8")
        dom = _chromium(budget, f"--window-size={width},800", "--dump-dom", copy.as_uri(),
                        timeout=timeout).stdout  # fmt: skip
    if height is None:
        found = re.search(r'data-mitk-height="(\d+)"', dom)
        if found is None:
            raise RuntimeError("the page never finished loading in Chromium")
        height = min(int(found.group(1)), MAX_HEIGHT)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.unlink(missing_ok=True)
    size = f"--window-size={width},{height}"
    _chromium(budget, size, f"--screenshot={out_png.resolve()}", url, timeout=timeout)
    if not out_png.exists():
        raise RuntimeError(f"chromium exited 0 but wrote no screenshot at {out_png}")
    return RenderResult(dom=dom, screenshot=out_png)


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes) to ``[h, w, c]``.

    Written here so the tests need no imaging library.
    """
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, header = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        if kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {2: 3, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}")
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        out[y] = prev = _unfilter(int(raw[y, 0]), raw[y, 1:], prev, channels)
    return out.reshape(height, width, channels)


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    # None, Sub and Up vectorise; Average and Paeth depend on the byte just decoded
    if kind == 0:
        return line
    if kind == 1:
        return (line.reshape(-1, bpp).cumsum(0, dtype=np.uint8)).reshape(-1)
    if kind == 2:
        return line + prev
    cur, up = bytearray(line.tobytes()), prev.tobytes()
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = up[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
            continue
        c = up[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[i] = (cur[i] + pred) & 0xFF
    return np.frombuffer(bytes(cur), np.uint8)
