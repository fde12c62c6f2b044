"""Static PNG/SVG/PDF export of figures, through plotly's Kaleido and a headless Chrome.

Kaleido is optional (``pip install 'mitk[export]'``); without it, or without a
Chrome it can drive, ``save_image`` raises ``ImageExportError`` saying what to
install. HTML dashboards never need either.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from mitk.atomic import atomic_write_bytes
from mitk.errors import ConfigError, MitkError

FORMATS = ("png", "svg", "pdf")
INSTALL_KALEIDO = "pip install 'mitk[export]'  (or: pip install 'kaleido>=1')"
INSTALL_CHROME = (
    "apt-get install chromium  (Debian/Ubuntu; elsewhere your system's Chromium or Chrome "
    "package), and if Kaleido does not find it, set BROWSER_PATH to the browser "
    "(e.g. BROWSER_PATH=/usr/bin/chromium); with internet access, plotly_get_chrome "
    "downloads a Chrome for Kaleido instead"
)


class ImageExportError(MitkError, RuntimeError):
    """A static image could not be rendered: Kaleido or its Chrome is missing or failed."""


def _kaleido_version() -> str | None:
    try:
        return version("kaleido")
    except PackageNotFoundError:
        return None


def _require_kaleido() -> None:
    found = _kaleido_version()
    if found is None or int(found.split(".")[0]) < 1:
        have = f"kaleido {found} is too old" if found else "kaleido is not installed"
        raise ImageExportError(
            f"static image export needs Kaleido ≥ 1 and a Chrome/Chromium it can drive; "
            f"{have}. Install it with: {INSTALL_KALEIDO}; then, if no Chrome is installed: "
            f"{INSTALL_CHROME}. HTML output (mitk.viz.dashboard) needs neither."
        )


def save_image(
    fig: go.Figure,
    path: str | Path,
    *,
    width: int | None = None,
    height: int | None = None,
    scale: int | float | None = None,
) -> Path:
    """Render ``fig`` to ``path`` (format from the suffix: .png, .svg or .pdf), atomically.

    Raises ``ImageExportError`` naming what to install when Kaleido or Chrome
    is missing, and ``ConfigError`` for an unsupported suffix.
    """
    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"cannot export {target.name!r}: use a suffix in {FORMATS}")
    _require_kaleido()
    try:
        image = pio.to_image(fig, format=fmt, width=width, height=height, scale=scale)
    except RuntimeError as error:  # plotly's wording for "Kaleido found no Chrome"
        raise ImageExportError(
            f"Kaleido could not render {target.name!r}; it needs a Chrome/Chromium. "
            f"Install one with: {INSTALL_CHROME}. (Kaleido said: {str(error).strip()})"
        ) from error
    return atomic_write_bytes(target, image)
