"""Dashboards: one self-contained, deterministic HTML file, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
import re

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from mitk.model.factored_matrix import FactoredMatrix
from mitk.sae.features import LatentStatistics
from mitk.sae.trainer import TrainResult
from mitk.viz import (
    Section,
    UnsupportedResultError,
    as_sections,
    attention_heatmap,
    dashboard,
    dashboard_html,
    dla_bar,
    figures_for,
)
from tests.unit.viz.results import attribution, evaluation, lens, patch_result

HEADER = {"model": "toy <2 layers>", "prompts": "16 × repeated tokens", "settings": "pos=-2"}


def figure_ids(page: str) -> list[str]:
    return re.findall(r'<div id="(figure-\d+)" class="plotly-graph-div"', page)


def test_dashboard_is_one_self_contained_file(tmp_path: Path) -> None:
    items = [
        Section("bars", dla_bar(attribution()), note="a <note>"),
        go.Figure(go.Scatter(x=[1], y=[2]), layout={"title": "untitled & scatter"}),
        pd.DataFrame({"a": [1.23456]}),
        "plain & simple\n\nsecond paragraph",
        patch_result("head", (2, 2)),
    ]
    path = dashboard(tmp_path / "sub" / "d.html", title="T", header=HEADER, items=items)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script src=" not in page
    assert page.count("plotly.js v") == 1  # inlined once, however many figures
    assert page.count("Plotly.newPlot") == 4 and figure_ids(page) == [
        f"figure-{i}" for i in range(4)
    ]
    for key, value in (("model", "toy &lt;2 layers&gt;"), ("prompts", "16 × repeated tokens")):
        assert f"<tr><th>{key}</th><td>{value}</td></tr>" in page
    assert "a &lt;note&gt;" in page and "<h2>untitled &amp; scatter</h2>" in page
    assert "<p>plain &amp; simple</p><p>second paragraph</p>" in page and "1.235" in page
    assert "Activation patching: z per head (recovery)" in page
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_dashboard_is_deterministic() -> None:
    items = [dla_bar(attribution()), attribution(), pd.DataFrame({"x": [1, 2]})]
    assert dashboard_html("T", HEADER, items) == dashboard_html("T", HEADER, items)


def test_dashboard_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = dashboard(tmp_path / "d.html", title="old", header={}, items=["old"])
    before = path.read_bytes()
    with pytest.raises(UnsupportedResultError, match="no default figure for object"):
        dashboard(path, title="new", header={}, items=["new", object()])

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        dashboard(path, title="new", header={}, items=["new"])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["d.html"]  # no temp left


def test_long_tables_are_cut_with_a_note() -> None:
    page = dashboard_html("T", {}, [pd.DataFrame({"n": range(250)})])
    assert (
        "First 200 of 250 rows." in page and "<td>199</td>" in page and "<td>200</td>" not in page
    )


def statistics() -> LatentStatistics:
    """Two latents over one sequence of four tokens; latent 1 never fired."""
    return LatentStatistics(
        hook_name="blocks.0.hook_resid_post", n_tokens=4,
        frequency=torch.tensor([0.5, 0.0]), mean_when_active=torch.tensor([1.5, float("nan")]),
        max_activation=torch.tensor([2.0, 0.0]), top_activations=torch.tensor([[2.0], [0.0]]),
        top_sequences=torch.tensor([[0], [-1]]), top_positions=torch.tensor([[2], [-1]]),
        top_windows=torch.tensor([[[1.0, 2.0, 0.0]], [[0.0, 0.0, 0.0]]]),
        context_before=1, context_after=1, tokens=torch.tensor([[4, 5, 6, 7]]),
    )  # fmt: skip


def test_figures_for_known_results() -> None:
    the_lens, _ = lens()
    history = [{"step": 1, "tokens": 8, "h/loss": 1.0, "h/l0": 3.0, "h/fvu": 0.2}]
    circuit = FactoredMatrix(torch.randn(2, 2, 4, 2), torch.randn(2, 2, 2, 4))
    titles = {
        "patch": [s.title for s in figures_for(patch_result("pos", (2, 3)))],
        "facets": [s.title for s in figures_for(patch_result("head_pos", (2, 2, 3)))],
        "dla": [s.title for s in figures_for(attribution())],
        "lens": [s.title for s in figures_for(the_lens)],
        "train": [s.title for s in figures_for(TrainResult({}, history))],
        "eval": [s.title for s in figures_for(evaluation("h"))],
        "stats": [s.title for s in figures_for(statistics())],
        "circuit": [s.title for s in figures_for(circuit)],
        "composition": [s.title for s in figures_for(torch.rand(2, 2, 2, 2))],
    }
    assert titles == {
        "patch": [
            "Activation patching: z per pos (recovery)",
            "Activation patching: z per pos (metric)",
        ],
        "facets": ["Activation patching: z per head_pos"],
        "dla": ["Direct logit attribution", "Direct logit attribution per head"],
        "lens": ["Logit lens"],
        "train": ["SAE training: h"],
        "eval": ["SAE evaluation: h", "Latent density: h"],
        "stats": ["Latent density: blocks.0.hook_resid_post", "Latent 0"],  # latent 1 is dead
        "circuit": ["Circuit eigenvalues"],
        "composition": ["Composition scores"],
    }
    card = figures_for(statistics())[1].content
    assert isinstance(card, go.Figure) and [list(r) for r in card.data[0].text] == [["5", "6", "7"]]
    with pytest.raises(UnsupportedResultError):
        figures_for(torch.rand(3))


def test_a_heading_replaces_the_figures_own_title() -> None:
    titled = go.Figure(go.Bar(y=[1.0]), layout={"title": "Plot title XYZ"})
    selector = attention_heatmap(torch.rand(2, 3, 3), list("abc"), head_labels=["L0H0", "L0H1"])
    page = dashboard_html("T", {}, [Section("Bars", titled), Section("Heads", selector)])
    assert "<h2>Bars</h2>" in page and "Plot title XYZ" not in page
    figures = page[page.index("Plotly.newPlot") :]  # past the inlined plotly.js
    assert "Attention pattern" not in figures and '"title.text"' not in figures  # nor on a click
    assert '"visible":[false,true]' in page  # the head selector still switches heads
    assert re.findall(r'"margin":\{[^}]*\}', page) == ['"margin":{"t":30}', '"margin":{"t":55}']
    assert page.count('"displayModeBar": false') == 2  # no toolbar over the plots
    assert titled.layout.title.text == "Plot title XYZ"  # the caller's figure is untouched
    assert titled.layout.margin.t is None
    # without a heading the figure keeps its title, and the room plotly leaves for it
    kept = dashboard_html("T", {}, [Section("", titled)])
    assert "Plot title XYZ" in kept and '"margin"' not in kept


def test_untitled_items_are_headed_by_what_they_show() -> None:
    scatter = go.Figure(go.Scatter(x=[1], y=[2]), layout={"xaxis_title": "step"})
    scatter.update_layout(yaxis_title="loss <b>&amp;</b> l0")
    sections = [
        *as_sections(scatter),
        *as_sections(go.Figure([go.Bar(y=[1]), go.Heatmap(z=[[1]])])),
        *as_sections(go.Figure()),
        *as_sections(pd.DataFrame({"head": [1], "score": [0.5]})),
        *as_sections(pd.DataFrame({c: [1] for c in "abcde"})),
        *as_sections(go.Figure(layout={"title": "A<br>b &amp; c"})),
    ]
    assert [s.title for s in sections] == [
        "Scatter plot: loss & l0 by step",
        "Bar chart and heatmap",
        "Empty figure",
        "Table: head, score",
        "Table: a, b, c, d, …",
        "A b & c",
    ]
    assert "<h2>Scatter plot: loss &amp; l0 by step</h2>" in dashboard_html("T", {}, [scatter])


def test_a_long_contents_list_is_set_in_two_columns() -> None:
    short = dashboard_html("T", {}, [Section(f"s{i}", "x") for i in range(3)])
    long = dashboard_html("T", {}, [Section(f"s{i}", "x") for i in range(8)])
    assert "<nav><ol><li>" in short and "<nav><ol class='columns'><li>" in long
    assert "nav ol.columns { columns: 2; }" in long
