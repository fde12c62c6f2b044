"""Figures carry the result's numbers and labels; reports are self-contained pages."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from mitk.analysis.dla import Attribution
from mitk.viz import (
    Section,
    composition_heatmap,
    dashboard,
    dla_bar,
    head_scores_heatmap,
    patching_heatmap,
)


def attribution() -> Attribution:
    values = torch.tensor([[1.0, 3.0], [-2.0, -2.0], [0.5, 0.5]])
    return Attribution(values, ["embed", "L0H0", "b_U"], values.sum(0))


def test_dla_bar_plots_means_with_component_labels() -> None:
    fig = dla_bar(attribution())
    bar = fig.data[0]
    assert list(bar.x) == ["embed", "L0H0", "b_U"]
    assert list(bar.y) == [2.0, -2.0, 0.5]
    assert bar.marker.color[1] != bar.marker.color[0]  # negative bars stand out
    assert list(dla_bar(attribution(), prompt=1).data[0].y) == [3.0, -2.0, 0.5]


def test_head_heatmap_is_layer_by_head() -> None:
    scores = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                           "induction": [0.1, 0.2, 0.9, 0.3]})  # fmt: skip
    heat = head_scores_heatmap(scores, "induction").data[0]
    assert list(heat.y) == ["L0", "L1"] and list(heat.x) == ["H0", "H1"]
    assert heat.z[1][0] == pytest.approx(0.9)
    with pytest.raises(KeyError, match="no column 'nope'"):
        head_scores_heatmap(scores, "nope")


def test_composition_heatmap_centres_on_baseline() -> None:
    scores = torch.rand(2, 3, 2, 3)
    fig = composition_heatmap(scores, baseline=0.2)
    heat = fig.data[0]
    assert len(heat.x) == 6 and heat.x[4] == "L1H1" and heat.zmid == 0.2
    assert heat.z[1][5] == pytest.approx(float(scores[0, 1, 1, 2]))
    assert math.isnan(heat.z[4][1]) and math.isnan(heat.z[0][2])  # reader not later: blank


def test_report_is_one_self_contained_file(tmp_path: Path) -> None:
    sections = [
        Section("bars", dla_bar(attribution()), note="a <note>"),
        Section("again", dla_bar(attribution(), prompt=0)),
        Section("table", pd.DataFrame({"a": [1.23456]})),
        Section("text", "plain & simple"),
    ]
    path = dashboard(
        tmp_path / "sub" / "r.html", title="Title", header={"model": "m<1>"}, items=sections
    )
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "m&lt;1&gt;" in page and "a &lt;note&gt;" in page
    assert "<script src=" not in page
    # plotly.js is inlined exactly once however many figures there are
    assert page.count("plotly.js v") == 1 and page.count("Plotly.newPlot") == 2
    assert "1.235" in page and "plain &amp; simple" in page


def test_patching_heatmap_axes() -> None:
    from mitk.analysis.patching import PatchResult

    result = PatchResult(
        per_prompt=torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), clean=torch.tensor([2.0]),
        corrupted=torch.tensor([0.0]), site="z", per="head", direction="denoising", layers=[0, 1],
    )  # fmt: skip
    heat = patching_heatmap(result).data[0]
    assert list(heat.x) == ["H0", "H1"] and list(heat.y) == ["L0", "L1"]
    assert heat.z[1][1] == pytest.approx(1.5) and heat.zmax == 1
    raw = patching_heatmap(result, normalized=False).data[0]
    assert raw.z[1][1] == pytest.approx(3.0) and raw.zmid == 0
