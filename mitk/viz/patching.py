"""Activation-patching figures: layer × position, layer × head and faceted layer × head × position.

Raw metric values get a diverging scale centred at 0; normalised recovery
(``PatchResult.normalized()``: 0 = corrupted, 1 = clean) a 0–1 scale.

Uncertainty over prompts (``PatchResult.confidence_interval`` and
``p_values``): heatmaps show each cell's 95% bootstrap interval and p-value on
hover and mark with a grey × the cells not significant at ``alpha``
(Benjamini–Hochberg over the figure's cells); ``patching_curve`` draws a
per-layer result with error bars. By default this needs enough prompts for a
cell to reach significance at all (``min_prompts``: 6 at alpha = 0.05); a
prompt-averaged result (one prompt) never shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
import torch
from torch import Tensor

from mitk.analysis.patching import PatchResult
from mitk.analysis.patching.uncertainty import benjamini_hochberg
from mitk.errors import ConfigError
from mitk.viz.axes import check_tokens, raw_scale, token_axis, unit_scale


def _values(result: PatchResult, normalized: bool) -> Tensor:
    return (result.normalized() if normalized else result.values).detach().double().cpu()


def _what(result: PatchResult, normalized: bool) -> str:
    what = "recovery (normalised)" if normalized else "metric"
    return f"Patching {result.site} per {result.per} ({result.direction}): {what}"


def min_prompts(alpha: float) -> int:
    """Fewest prompts whose exact sign-flip test can give p <= ``alpha`` (2 / 2**n <= alpha)."""
    return max(1, math.ceil(math.log2(2 / alpha)))


def _uncertainty(
    result: PatchResult, normalized: bool, alpha: float, show: bool | None
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(low, high, p, unmarked)`` on the values' grid (unmarked: significant or empty) or None."""
    if show is None:
        show = result.per_prompt.shape[0] >= min_prompts(alpha)
    if not show:
        return None
    low, high = result.confidence_interval(normalized=normalized)
    p = result.p_values()
    # a cell no prompt has (NaN) is blank, not "not significant"
    keep = benjamini_hochberg(p, alpha) | p.isnan()
    return low.double().cpu(), high.double().cpu(), p.double().cpu(), keep.cpu()


def _hover(low: Tensor, high: Tensor, p: Tensor) -> dict[str, Any]:
    """Heatmap settings that show each cell's interval and p-value on hover."""
    return {
        "customdata": torch.stack([low, high, p], -1).tolist(),
        "hovertemplate": "%{y}, %{x}: %{z:.3g}<br>95% CI [%{customdata[0]:.3g}, "
        "%{customdata[1]:.3g}]<br>p = %{customdata[2]:.2g}<extra></extra>",
    }


def _marks(x: list[Any], y: list[Any], alpha: float, **trace: Any) -> go.Scatter:
    """Grey crosses on cells that are not significant."""
    return go.Scatter(
        x=x,
        y=y,
        mode="markers",
        marker={"symbol": "x-thin-open", "size": 10, "line": {"width": 1.5, "color": "grey"}},
        name=f"not significant (BH, α={alpha:g})",
        hoverinfo="skip",
        **trace,
    )


def patching_heatmap(
    result: PatchResult,
    normalized: bool = True,
    *,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
    alpha: float = 0.05,
    uncertainty: bool | None = None,
) -> go.Figure:
    """Heatmap of a ``per="layer" | "pos" | "head"`` result: layers down, positions or heads across.

    ``tokens`` labels the position axis of a ``per="pos"`` result. A
    ``per="head_pos"`` result has three axes: use ``patching_facets``.
    ``uncertainty``: hover intervals and crosses on non-significant cells (see
    the module docstring); None shows them when there are enough prompts.
    """
    values = _values(result, normalized)
    spread = _uncertainty(result, normalized, alpha, uncertainty)
    if values.ndim == 1:  # per="layer": one column
        values = values[:, None]
        spread = None if spread is None else tuple(t[:, None] for t in spread)  # type: ignore[assignment]
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
    rows = [f"L{layer}" for layer in result.layers]
    hover = {} if spread is None else _hover(*spread[:3])
    fig = go.Figure(go.Heatmap(z=values.tolist(), x=columns, y=rows, **scale, **hover))
    if spread is not None:
        cells = (~spread[3]).nonzero().tolist()
        fig.add_trace(_marks([columns[j] for _, j in cells], [rows[i] for i, _ in cells], alpha))
        fig.update_layout(legend={"orientation": "h", "y": -0.15})
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
    alpha: float = 0.05,
    uncertainty: bool | None = None,
) -> go.Figure:
    """One head × position heatmap per layer of a ``per="head_pos"`` result, on one colour axis.

    Facets are laid out ``columns`` wide; ``tokens`` labels the position axes.
    ``uncertainty`` as for ``patching_heatmap`` (one correction over all facets).
    """
    values = _values(result, normalized)
    if result.per != "head_pos":
        raise ConfigError(f"patching_facets draws per='head_pos' results, not per={result.per!r}")
    spread = _uncertainty(result, normalized, alpha, uncertainty)
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
    heads = [f"H{h}" for h in range(n_heads)]
    for i, layer in enumerate(result.layers):
        where = {"row": i // n_cols + 1, "col": i % n_cols + 1}
        hover = {} if spread is None else _hover(*(t[i] for t in spread[:3]))
        fig.add_trace(
            go.Heatmap(
                z=values[i].tolist(),
                x=list(range(n_pos)),
                y=heads,
                coloraxis="coloraxis",
                name=f"L{layer}",
                **hover,
            ),
            **where,
        )
        if spread is not None:
            cells = (~spread[3][i]).nonzero().tolist()
            marks = _marks([p for _, p in cells], [heads[h] for h, _ in cells], alpha,
                           showlegend=i == 0, legendgroup="marks")  # fmt: skip
            fig.add_trace(marks, **where)
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


def patching_curve(
    result: PatchResult,
    normalized: bool = True,
    *,
    confidence: float = 0.95,
    alpha: float = 0.05,
    title: str | None = None,
) -> go.Figure:
    """A ``per="layer"`` result as a line over layers with bootstrap error bars.

    Error bars span the ``confidence`` interval over prompts; layers not
    significant at ``alpha`` (Benjamini–Hochberg over the layers) get hollow
    markers. One prompt gives zero-width bars and every marker hollow.
    """
    if result.per != "layer":
        raise ConfigError(f"patching_curve draws per='layer' results, not per={result.per!r}")
    values = _values(result, normalized)
    low, high = (
        t.double().cpu() for t in result.confidence_interval(confidence, normalized=normalized)
    )
    p = result.p_values()
    significant = benjamini_hochberg(p, alpha).tolist()
    fig = go.Figure(
        go.Scatter(
            x=list(result.layers),
            y=values.tolist(),
            mode="lines+markers",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": (high - values).tolist(),
                "arrayminus": (values - low).tolist(),
            },
            marker={
                "size": 9,
                "symbol": ["circle" if s else "circle-open" for s in significant],
            },
            customdata=p.double().cpu().tolist(),
            hovertemplate="layer %{x}: %{y:.3g}<br>p = %{customdata:.2g}<extra></extra>",
            name=f"mean over {result.per_prompt.shape[0]} prompts, {confidence:.0%} CI",
        )
    )
    fig.update_layout(
        title=title or _what(result, normalized),
        xaxis_title="layer",
        yaxis_title="recovery" if normalized else "metric",
        showlegend=True,
    )
    return fig
