"""Head-level circuit figures: detector scores, composition against chance, QK/OV eigenvalues."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from mitk.model.factored_matrix import FactoredMatrix
from mitk.shapes import Float
from mitk.viz.axes import head_label, layer_head_heatmap, unit_scale


def head_scores_heatmap(scores: pd.DataFrame, column: str, title: str | None = None) -> go.Figure:
    """Layer × head heatmap of one detector column from ``head_detector_scores``."""
    if column not in scores.columns:
        raise KeyError(f"no column {column!r}; have {list(scores.columns)}")
    grid = scores.pivot(index="layer", columns="head", values=column)
    return layer_head_heatmap(
        grid.to_numpy(),
        grid.index.tolist(),
        grid.columns.tolist(),
        title or f"{column.replace('_', '-')} score per head",
        **unit_scale(),
        colorbar={"title": "score"},
    )


def composition_heatmap(
    scores: Float[Tensor, "layer head layer2 head2"],
    baseline: float | None = None,
    title: str = "Composition scores (writer → reader)",
) -> go.Figure:
    """Writer head × reader head heatmap; with a baseline the colour centres on chance.

    ``scores`` is ``composition_scores(...)``; ``baseline`` the mean of
    ``composition_baseline(...)``. Pairs whose reader is not in a later layer
    cannot compose and are left blank.
    """
    n_layers, n_heads = scores.shape[0], scores.shape[1]
    labels = [head_label(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    grid = scores.detach().double().cpu().reshape(n_layers * n_heads, n_layers * n_heads).clone()
    layer_of = torch.arange(n_layers).repeat_interleave(n_heads)
    grid[layer_of[None, :] <= layer_of[:, None]] = float("nan")  # plotly draws NaN as a gap
    heatmap: dict[str, Any] = {"colorscale": "Viridis"}
    if baseline is not None:
        heatmap = {"colorscale": "RdBu_r", "zmid": baseline}
        title = f"{title}; random baseline {baseline:.3f}"
    fig = go.Figure(go.Heatmap(z=grid.tolist(), x=labels, y=labels, **heatmap))
    fig.update_layout(
        title=title, xaxis_title="reader", yaxis_title="writer", yaxis_autorange="reversed"
    )
    return fig


def _head_names(lead: tuple[int, ...]) -> list[str]:
    """Labels for the leading ``[layer, head]`` (or ``[head]``, or no) dims of a circuit."""
    if len(lead) == 2:
        return [head_label(layer, head) for layer in range(lead[0]) for head in range(lead[1])]
    if len(lead) == 1:
        return [f"H{head}" for head in range(lead[0])]
    return ["circuit"]


def _complex_text(value: complex) -> str:
    sign = "+" if value.imag >= 0 else "−"
    return f"λ = {value.real:.3g} {sign} {abs(value.imag):.3g}i"


def eigenvalue_scatter(
    circuit: FactoredMatrix, kind: str = "OV", title: str | None = None, *, normalize: bool = True
) -> go.Figure:
    """Eigenvalues of each head's circuit in the complex plane, one trace (legend entry) per head.

    ``circuit`` is square per head with leading dims ``[layer, head]``. The
    legend gives each head's ``Σλ / Σ|λ|``: for a full circuit in token space
    (``mitk.analysis.circuits.full_ov_circuit``, ``W_E W_V W_O W_U``), near +1
    for a head that copies the token it attends to, near -1 for one that
    suppresses it (the same number as ``ov_copying_scores``). The
    ``d_model``-space ``model.OV`` (``W_V W_O``) has no such reading: without the
    embedding and unembedding its eigenvalues' signs say nothing about tokens.

    With ``normalize`` each head's eigenvalues are divided by its largest
    ``|λ|``, so heads of very different magnitudes all fill the unit disc
    instead of piling up at the origin; the hover shows the raw value. The
    score is scale-free, so it is the same either way.
    """
    eig = circuit.eigenvalues.detach().cpu()
    flat = eig.reshape(-1, eig.shape[-1])
    positivity = (flat.sum(-1).real / flat.abs().sum(-1)).tolist()
    biggest = flat.abs().amax(-1, keepdim=True)
    shown = flat / biggest.clamp_min(torch.finfo(biggest.dtype).tiny) if normalize else flat
    fig = go.Figure()
    for name, values, raw, score in zip(
        _head_names(tuple(eig.shape[:-1])), shown, flat, positivity, strict=True
    ):
        fig.add_trace(
            go.Scatter(
                x=values.real.tolist(),
                y=values.imag.tolist(),
                mode="markers",
                name=f"{name} ({score:+.2f})",
                marker={"size": 7, "opacity": 0.8},
                hovertext=[_complex_text(v) for v in raw.tolist()],
                hovertemplate="%{hovertext}<extra>%{fullData.name}</extra>",
            )
        )
    fig.add_vline(x=0, line={"color": "#999", "width": 1})
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    unit = " / head's largest |λ|" if normalize else ""
    axis = {"range": [-1.1, 1.1]} if normalize else {}
    fig.update_layout(
        title=title or f"{kind} circuit eigenvalues per head (legend: Σλ/Σ|λ|)",
        # the complex plane keeps its aspect by narrowing the plot, not by widening the range
        xaxis={"title": f"real part{unit}", "constrain": "domain", **axis},
        yaxis={"title": f"imaginary part{unit}", "scaleanchor": "x", "scaleratio": 1, **axis},
        legend={"title": {"text": "head (Σλ/Σ|λ|)"}},
        height=560,
    )
    return fig
