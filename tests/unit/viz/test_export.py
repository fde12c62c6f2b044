"""Static image export says what to install when Kaleido or Chrome is missing."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from mitk.errors import ConfigError, MitkError
from mitk.viz import ImageExportError, save_image
import mitk.viz.export as export

FIGURE = go.Figure(go.Bar(x=["a"], y=[1]))


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="suffix"):
        save_image(FIGURE, tmp_path / "plot.gif")


def test_missing_kaleido_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_kaleido_version", lambda: None)
    with pytest.raises(ImageExportError, match=r"mitk\[export\]") as caught:
        save_image(FIGURE, tmp_path / "plot.png")
    assert isinstance(caught.value, MitkError) and "plotly_get_chrome" in str(caught.value)
    assert "apt-get install chromium" in str(caught.value) and "BROWSER_PATH" in str(caught.value)
    monkeypatch.setattr(export, "_kaleido_version", lambda: "0.2.1")
    with pytest.raises(ImageExportError, match=r"kaleido 0\.2\.1 is too old"):
        save_image(FIGURE, tmp_path / "plot.svg")
    assert not list(tmp_path.iterdir())


def test_missing_chrome_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_chrome(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(export, "_kaleido_version", lambda: "1.2.0")
    monkeypatch.setattr(pio, "to_image", no_chrome)
    with pytest.raises(ImageExportError, match="plotly_get_chrome") as caught:
        save_image(FIGURE, tmp_path / "plot.png")
    # a closed network cannot download Chrome: the system package and Kaleido's override come first
    message = str(caught.value)
    assert "apt-get install chromium" in message and "BROWSER_PATH" in message
    assert message.index("apt-get") < message.index("plotly_get_chrome")
    assert "Kaleido requires Google Chrome" in message


def test_rendered_bytes_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = {}

    def fake_render(fig: go.Figure, **options: object) -> bytes:
        asked.update(options)
        return b"<svg/>"

    monkeypatch.setattr(export, "_kaleido_version", lambda: "1.2.0")
    monkeypatch.setattr(pio, "to_image", fake_render)
    path = save_image(FIGURE, tmp_path / "out" / "plot.SVG", width=300, scale=2.0)
    assert path.read_bytes() == b"<svg/>" and asked["format"] == "svg" and asked["width"] == 300
