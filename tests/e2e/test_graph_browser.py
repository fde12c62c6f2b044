"""The attribution-graph viewer as a person sees it: drawn in headless Chromium, clicked, quiet.

The page draws its SVG from the embedded JSON when its script runs, so the nodes and edges
in the DOM after load prove the script ran. A copy of the page gets two extra scripts: one
first in the head that records uncaught errors and ``console.error`` calls on the root
element, one after the viewer that clicks a feature node, so the dumped DOM shows both.
"""

from __future__ import annotations

import json
from pathlib import Path
import re

import pytest

from mitk.analysis.graphs import attribution_graph, prune_graph
from mitk.viz.attribution_graph import DATA_ID, graph_viewer
from tests.e2e.browser import NoBrowserError, ensure_chromium, read_png, render
from tests.unit.graphs.models import model, prompt, transcoders

pytestmark = pytest.mark.slow

_RECORD_ERRORS = (
    "<script>(() => { const root = document.documentElement;"
    " const note = text => root.setAttribute('data-errors',"
    " (root.getAttribute('data-errors') || '') + '|' + text);"
    " addEventListener('error', e => note(e.message));"
    " addEventListener('unhandledrejection', e => note(String(e.reason)));"
    " const original = console.error;"
    " console.error = (...args) => { note(args.join(' ')); original(...args); }; })();</script>"
)
_CLICK_A_FEATURE = (
    "<script>addEventListener('load', () => document.querySelector('.kind-feature')"
    ".dispatchEvent(new MouseEvent('click', {bubbles: true})));</script>"
)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium, installed on first use; a machine without it fails the tests, never skips."""
    try:
        return ensure_chromium()
    except NoBrowserError as error:
        pytest.fail(f"no browser to check the graph viewer with: {error}")


def instrumented(page: Path, click: bool = True) -> Path:
    """A copy of ``page`` that records errors and (``click``) clicks its first feature node."""
    text = page.read_text(encoding="utf-8")
    text = text.replace("<head>", "<head>" + _RECORD_ERRORS, 1)
    if click:
        text = text.replace("</body>", _CLICK_A_FEATURE + "</body>", 1)
    copy = page.with_name(f"instrumented-{page.name}")
    copy.write_text(text, encoding="utf-8")
    return copy


def errors(dom: str) -> list[str]:
    """What the recorder noted on the root element: uncaught errors and console.error calls."""
    found = re.search(r'<html[^>]* data-errors="([^"]*)"', dom)
    return [] if found is None else found.group(1).split("|")[1:]


def test_the_error_recorder_sees_a_broken_script(chromium: Path, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head></head><body><script>noSuchFunction();"
                    "</script></body></html>")  # fmt: skip
    drawn = render(instrumented(page, click=False), tmp_path / "broken.png", width=400, height=300)
    assert any("noSuchFunction" in error for error in errors(drawn.dom)), drawn.dom[:400]


def test_the_viewer_draws_every_pruned_node_and_edge_without_errors(
    chromium: Path, tmp_path: Path
) -> None:
    built = model()
    graph = attribution_graph(built, transcoders(built), prompt())
    pruned = prune_graph(graph)
    n_nodes, n_edges = int(pruned.node_mask.sum()), int(pruned.edge_mask.sum())
    page = tmp_path / "graph.html"
    embedded = re.compile(rf"id='{DATA_ID}'>(.*?)</script>", re.DOTALL)
    first = graph_viewer(page, graph)  # find a feature the page shows, then give it examples
    shown = json.loads(embedded.findall(first.read_text())[0])["nodes"]
    feature = next(n for n in shown if n["kind"] == "feature")
    key = (feature["layer"], feature["feature"])
    graph_viewer(page, graph, examples={key: [("an example context", 3.5)]},
                 logit_effects={key: [("promoted", 0.5)]})  # fmt: skip

    drawn = render(instrumented(page), tmp_path / "graph.png", width=1200)

    assert errors(drawn.dom) == [], errors(drawn.dom)
    assert drawn.dom.count('class="node ') == n_nodes
    assert len(re.findall(r'class="edge( dim| lit)?"', drawn.dom)) == n_edges
    assert f'data-nodes="{n_nodes}"' in drawn.dom and f'data-edges="{n_edges}"' in drawn.dom
    assert drawn.dom.count('class="column-label"') == graph.nodes.n_pos
    # the click selected the first feature drawn and filled the details panel
    assert len(re.findall(r'class="node kind-feature selected"', drawn.dom)) == 1
    assert 'class="edge dim"' in drawn.dom and 'class="edge lit"' in drawn.dom
    details = drawn.dom[drawn.dom.index('id="details"') :]
    assert f"feature L{key[0]} #{key[1]}" in details
    assert "an example context" in details and "promoted" in details
    assert "Strongest inputs" in details and "Strongest outputs" in details
    picture = read_png(drawn.screenshot)
    r, g, b = (picture[..., c].astype(int) for c in range(3))
    edge_blue = (b - r > 40) & (b > g)  # the clicked node's blue edges; not green tokens
    orange = (picture[..., 0] > 180) & (picture[..., 1] < 150) & (picture[..., 2] < 90)
    assert orange.sum() > 50 and edge_blue.sum() > 20, (orange.sum(), edge_blue.sum())
