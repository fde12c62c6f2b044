"""Activation-patching figures: layer × position, layer × head and faceted layer × head × position.

Raw metric values get a diverging scale centred at 0; normalised recovery
(``PatchResult.normalized()``: 0 = corrupted, 1 = clean) a 0–1 scale.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from mitk.analysis.patching import PatchResult
from mitk.errors import ConfigError
from mitk.viz.axes import check_tokens, raw_scale, token_axis, unit_scale


def _values(result: PatchResult, normalized: bool) -> Tensor:
    return (result.normalized() if normalized else result.values).detach().double().cpu()


def _what(result: PatchResult, normalized: bool) -> str:
    what = "recovery (normalised)" if normalized else "metric"
    return f"Patching {result.site} per {result.per} ({result.direction}): {what}"


def patching_heatmap(
    result: PatchResult,
    normalized: bool = True,
    *,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of a ``per="layer" | "pos" | "head"`` result: layers down, positions or heads across.

    ``tokens`` labels the position axis of a ``per="pos"`` result. A
    ``per="head_pos"`` result has three axes: use ``patching_facets``.
    """
    values = _values(result, normalized)
    if values.ndim == 1:  # per="layer": one column
        values = values[:, None]
    elif values.ndim != 2:
        raise ConfigError(
            f"patching_heatmap draws 1-D or 2-D results, not axes {result.axes}; "
            "use patching_facets"
        )
    column_axis = result.axes[1] if len(result.axes) > 1 else "all positions"
    xaxis: dict[str, Any] = {"title": column_axis}
    if column_axis == "pos":
        check_tokens(tokens, values.shape[1], "a patching result")
        columns: list[Any] = list(range(values.shape[1]))
        xaxis.update(token_axis(tokens) if tokens is not None else {})
    elif column_axis == "head":
        columns = [f"H{h}" for h in range(values.shape[1])]
    else:
        columns = ["all"]
    scale = unit_scale() if normalized else raw_scale()
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(), x=columns, y=[f"L{layer}" for layer in result.layers], **scale
        )
    )
    fig.update_layout(
        title=title or _what(result, normalized),
        xaxis=xaxis,
        yaxis_title="layer",
        yaxis_autorange="reversed",
    )
    return fig


def patching_facets(
    result: PatchResult,
    normalized: bool = True,
    *,
    tokens: Sequence[str] | None = None,
    columns: int = 3,
    title: str | None = None,
) -> go.Figure:
    """One head × position heatmap per layer of a ``per="head_pos"`` result, on one colour axis.

    Facets are laid out ``columns`` wide; ``tokens`` labels the position axes.
    """
    values = _values(result, normalized)
    if result.per != "head_pos":
        raise ConfigError(f"patching_facets draws per='head_pos' results, not per={result.per!r}")
    n_layers, n_heads, n_pos = values.shape
    check_tokens(tokens, n_pos, "a patching result")
    n_cols = max(1, min(columns, n_layers))
    n_rows = math.ceil(n_layers / n_cols)
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        shared_yaxes=True,
        subplot_titles=[f"layer {layer}" for layer in result.layers],
        vertical_spacing=min(0.12, 0.3 / n_rows),
    )
    for i, layer in enumerate(result.layers):
        fig.add_trace(
            go.Heatmap(
                z=values[i].tolist(),
                x=list(range(n_pos)),
                y=[f"H{h}" for h in range(n_heads)],
                coloraxis="coloraxis",
                name=f"L{layer}",
            ),
            row=i // n_cols + 1,
            col=i % n_cols + 1,
        )
    if tokens is not None:
        fig.update_xaxes(**token_axis(tokens))
    fig.update_yaxes(autorange="reversed")
    scale = unit_scale() if normalized else raw_scale()
    coloraxis = {"colorscale": scale["colorscale"]}
    coloraxis.update({"cmin": 0, "cmax": 1} if normalized else {"cmid": 0})
    fig.update_layout(
        title=title or _what(result, normalized), coloraxis=coloraxis, height=260 * n_rows + 100
    )
    return fig
