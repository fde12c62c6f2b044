"""Figures for analysis results: each maps a result to a plotly Figure and never runs a model."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from mitk.shapes import Float


def dla_bar(attribution: Any, prompt: int | None = None, title: str | None = None) -> go.Figure:
    """Bars of direct logit attribution per component (mean over prompts unless one is chosen).

    ``attribution`` is a ``mitk.analysis.dla.Attribution``; its ``labels`` label the bars.
    """
    values = attribution.values.detach().float().cpu()
    series = values[:, prompt] if prompt is not None else values.mean(1)
    colours = ["#c0392b" if v < 0 else "#2471a3" for v in series.tolist()]
    fig = go.Figure(go.Bar(x=attribution.labels, y=series.tolist(), marker_color=colours))
    which = f"prompt {prompt}" if prompt is not None else f"mean over {values.shape[1]} prompts"
    fig.update_layout(
        title=title or f"Direct logit attribution ({which})",
        xaxis_title="component",
        yaxis_title="contribution to logit (difference)",
    )
    return fig


def head_scores_heatmap(scores: pd.DataFrame, column: str, title: str | None = None) -> go.Figure:
    """Layer × head heatmap of one detector column from ``head_detector_scores``."""
    if column not in scores.columns:
        raise KeyError(f"no column {column!r}; have {list(scores.columns)}")
    grid = scores.pivot(index="layer", columns="head", values=column)
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[f"H{h}" for h in grid.columns],
            y=[f"L{layer}" for layer in grid.index],
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar={"title": "score"},
        )
    )
    fig.update_layout(title=title or f"{column.replace('_', '-')} score per head",
                      yaxis_autorange="reversed")  # fmt: skip
    return fig


def composition_heatmap(
    scores: Float[Tensor, "layer head layer2 head2"],
    baseline: float | None = None,
    title: str = "Composition scores (writer → reader)",
) -> go.Figure:
    """Writer head × reader head heatmap; with a baseline the colour centres on chance.

    Pairs whose reader is not in a later layer cannot compose and are left blank.
    """
    n_layers, n_heads = scores.shape[0], scores.shape[1]
    labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    grid = scores.detach().float().cpu().reshape(n_layers * n_heads, n_layers * n_heads).clone()
    layer_of = torch.arange(n_layers).repeat_interleave(n_heads)
    grid[layer_of[None, :] <= layer_of[:, None]] = float("nan")  # plotly draws NaN as a gap
    heatmap: dict[str, Any] = {"colorscale": "Viridis"}
    if baseline is not None:
        heatmap = {"colorscale": "RdBu_r", "zmid": baseline}
        title = f"{title}; random baseline {baseline:.3f}"
    fig = go.Figure(go.Heatmap(z=grid.tolist(), x=labels, y=labels, **heatmap))
    fig.update_layout(title=title, xaxis_title="reader", yaxis_title="writer",
                      yaxis_autorange="reversed")  # fmt: skip
    return fig


def patching_heatmap(result: Any, normalized: bool = True, title: str | None = None) -> go.Figure:
    """Heatmap of a 2-D patching result (``[layer, pos]`` or ``[layer, head]``).

    Normalised recovery uses a 0–1 scale; raw effects a diverging scale centred at 0.
    """
    values = (result.normalized() if normalized else result.values).detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"patching_heatmap needs a 2-D result, got axes {result.axes}")
    column_axis = result.axes[1]
    columns = [f"H{i}" if column_axis == "head" else str(i) for i in range(values.shape[1])]
    scale: dict[str, Any] = {"zmin": 0, "zmax": 1, "colorscale": "Blues"} if normalized \
        else {"zmid": 0, "colorscale": "RdBu"}  # fmt: skip
    fig = go.Figure(go.Heatmap(z=values.tolist(), x=columns,
                               y=[f"L{layer}" for layer in result.layers], **scale))  # fmt: skip
    what = "recovery (normalised)" if normalized else "metric"
    fig.update_layout(
        title=title or f"Patching {result.site} per {result.per}: {what}",
        xaxis_title=column_axis, yaxis_title="layer", yaxis_autorange="reversed",
    )  # fmt: skip
    return fig
