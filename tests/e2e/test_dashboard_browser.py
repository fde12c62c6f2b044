"""Dashboards as a person sees them: rendered in headless Chromium, screenshotted, inspected.

plotly builds its SVG only when its JavaScript runs in a browser, so counting the drawn nodes
in the DOM after load proves the figures rendered; the screenshot proves something visible
came of it. Chromium resolves no host names here, so a page that needed the network fails.
Screenshots stay in pytest's tmp dir (``--basetemp`` to keep them somewhere) for a look.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.sequences import repeated_random_tokens
from mitk.viz.dashboard import as_sections, dashboard
from mitk.viz.export import ImageExportError, save_image
from mitk.viz.section import Section
from tests.e2e.browser import NoBrowserError, ensure_chromium, read_png, render

pytestmark = pytest.mark.slow

BAR_RGB = (0xD3, 0x54, 0x00)  # a colour nothing else on the page uses


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium, installed on first use; a machine without it fails the tests, never skips."""
    try:
        return ensure_chromium()
    except NoBrowserError as error:
        pytest.fail(f"no browser to check the dashboard with: {error}")


class _Plots(HTMLParser):
    """Collects, for each plotly figure div, the CSS classes of everything inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: list[set[str]] = []
        self._depth = 0  # divs open inside the current figure; 0 when outside one

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        if self._depth:
            self.plots[-1] |= classes
            self._depth += tag == "div"
        elif tag == "div" and "plotly-graph-div" in classes:
            self.plots.append(set())
            self._depth = 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth and tag == "div":
            self._depth -= 1


def plots(dom: str) -> list[set[str]]:
    """The classes drawn inside each plotly figure of a rendered page, in page order."""
    parser = _Plots()
    parser.feed(dom)
    parser.close()
    return parser.plots


def ink(png: np.ndarray) -> tuple[float, int]:
    """Fraction of pixels that are not near-white, and the number of distinct colours."""
    rgb = png[..., :3].reshape(-1, 3).astype(np.int32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return float((rgb.min(1) < 245).mean()), len(np.unique(packed))


def assert_self_contained(page: str) -> None:
    assert "<script src=" not in page and 'src="http' not in page, "page needs the network"


def test_a_dashboard_draws_every_figure(chromium: Path, tmp_path: Path) -> None:
    bars = go.Figure(go.Bar(x=["L0H0", "L0H1", "L1H0"], y=[0.5, -1.0, 2.0],
                            marker_color="#{:02x}{:02x}{:02x}".format(*BAR_RGB)))  # fmt: skip
    heat = go.Figure(go.Heatmap(z=np.arange(24.0).reshape(4, 6), colorscale="Viridis"))
    table = pd.DataFrame({"head": ["L0H0", "L1H0"], "score": [0.1, 0.9]})
    page = dashboard(tmp_path / "page.html", title="browser check", header={"by": "test"},
                     items=[Section("Bars", bars), heat, table, "Plain words."])  # fmt: skip
    assert_self_contained(page.read_text())

    shown = render(page, tmp_path / "page.png", width=1200)

    drawn = plots(shown.dom)
    assert len(drawn) == 2 and all("main-svg" in p for p in drawn), drawn
    assert "bars" in drawn[0] and "hm" in drawn[1]  # the traces themselves, not just axes
    assert "Plain words." in shown.dom and "<td>L1H0</td>" in shown.dom
    picture = read_png(shown.screenshot)
    assert picture.shape[1] == 1200 and picture.shape[0] > 1000  # the whole page
    filled, colours = ink(picture)
    assert filled > 0.1 and colours > 100, (filled, colours)
    bar_pixels = np.all(picture[..., :3] == BAR_RGB, axis=-1).sum()
    assert bar_pixels > 20_000, bar_pixels  # three bars, each hundreds of pixels across


def test_a_dashboard_of_results_draws_their_default_figures(chromium: Path, tmp_path: Path) -> None:
    model = HookedTransformer.from_pretrained("toy-induction")
    tokens = repeated_random_tokens(4, 8, model.cfg.d_vocab, torch.Generator().manual_seed(0))
    corrupted = tokens.roll(1, 0)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    metric = logit_diff(tokens[:, -1], corrupted[:, -1], pos=-2)
    results = [
        logit_attribution(model, cache, tokens[:, -1], pos=-2, by="head"),
        activation_patch(model, tokens, corrupted, metric, "z", "head"),
    ]
    n_figures = sum(isinstance(s.content, go.Figure) for r in results for s in as_sections(r))
    page = dashboard(tmp_path / "results.html", title="results", header={}, items=results)

    shown = render(page, tmp_path / "results.png")

    drawn = plots(shown.dom)
    assert len(drawn) == n_figures >= 3
    assert all("main-svg" in p for p in drawn) and any("bars" in p for p in drawn)
    assert sum("hm" in p for p in drawn) >= 2  # per-head attribution and patching heatmaps
    filled, colours = ink(read_png(shown.screenshot))
    assert filled > 0.1 and colours > 200, (filled, colours)


def test_the_demo_report_draws_every_figure(chromium: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "mitk", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert_self_contained(page)
    n_figures = page.count('class="plotly-graph-div"')
    assert n_figures >= 5

    shown = render(out, tmp_path / "report.png")

    drawn = plots(shown.dom)
    assert len(drawn) == n_figures
    assert all("main-svg" in p for p in drawn), [sorted(p)[:5] for p in drawn]
    assert sum("hm" in p for p in drawn) >= 4  # detector, composition and patching heatmaps
    assert any("bars" in p for p in drawn)  # direct logit attribution
    filled, colours = ink(read_png(shown.screenshot))
    assert filled > 0.1 and colours > 200, (filled, colours)


def test_a_page_that_needs_the_network_draws_nothing(chromium: Path, tmp_path: Path) -> None:
    """The harness would catch a report that loads plotly from a CDN: no host resolves."""
    page = tmp_path / "cdn.html"
    pio.write_html(go.Figure(go.Bar(y=[1, 2])), page, include_plotlyjs="cdn")

    shown = render(page, tmp_path / "cdn.png", width=800, height=600)

    drawn = plots(shown.dom)
    assert len(drawn) == 1 and "main-svg" not in drawn[0]


def test_save_image_draws_png_and_svg_through_chromium(
    chromium: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(chromium))  # Kaleido's own override: this browser
    fig = go.Figure(go.Heatmap(z=[[0.0, 1.0], [2.0, 3.0]], colorscale="Viridis"))
    try:
        png = save_image(fig, tmp_path / "fig.png", width=600, height=400, scale=1)
        svg = save_image(fig, tmp_path / "fig.svg", width=600, height=400)
    except ImageExportError as error:  # Kaleido belongs in the test extra: fail, don't skip
        pytest.fail(f"static export is untested here: {error}")

    picture = read_png(png)
    assert picture.shape[:2] == (400, 600)
    filled, colours = ink(picture)
    assert filled > 0.3 and colours > 20, (filled, colours)
    text = svg.read_text()
    assert text.startswith("<svg") and 'class="main-svg"' in text and 'class="hm"' in text


def test_save_image_without_a_browser_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(ImageExportError, match=r"(?i)install") as raised:
        save_image(go.Figure(go.Bar(y=[1, 2])), tmp_path / "fig.png")
    assert "Traceback" not in str(raised.value)
    assert not (tmp_path / "fig.png").exists()
