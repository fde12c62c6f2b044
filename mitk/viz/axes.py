"""Conventions every figure shares: token position axes, the layer × head grid, colour scales."""

from __future__ import annotations

from collections.abc import Sequence
import html
import re
from typing import Any

import plotly.graph_objects as go

from mitk.errors import ShapeMismatchError


def plotly_text(text: str) -> str:
    """``text`` escaped for plotly, which reads labels as HTML-ish markup.

    Unescaped, a token such as ``<s>`` would start strikethrough (and vanish),
    ``<br>`` would break the line and ``&lt;`` would show as ``<``. plotly
    decodes the entities back, so the label reads exactly as ``text``.
    """
    return html.escape(text, quote=False)


def token_axis(tokens: Sequence[str]) -> dict[str, Any]:
    """Axis settings that label positions ``0 .. n-1`` with ``tokens`` (escaped for plotly).

    Positions stay numeric: a categorical axis would merge repeated tokens into
    one column, and repeats are exactly what induction prompts contain.
    """
    return {
        "tickmode": "array",
        "tickvals": list(range(len(tokens))),
        "ticktext": [plotly_text(t) for t in tokens],
    }


def check_tokens(tokens: Sequence[str] | None, n_pos: int, what: str) -> None:
    """Refuse token labels that do not match the ``pos`` axis they label."""
    if tokens is not None and len(tokens) != n_pos:
        raise ShapeMismatchError(f"{len(tokens)} token labels for {what} with {n_pos} positions")


def raw_scale() -> dict[str, Any]:
    """Diverging scale centred at 0, for signed effects (red lowers, blue raises)."""
    return {"colorscale": "RdBu", "zmid": 0}


def unit_scale(colorscale: str = "Blues") -> dict[str, Any]:
    """Sequential 0–1 scale, for normalised recovery, attention weights and detector scores."""
    return {"colorscale": colorscale, "zmin": 0, "zmax": 1}


def head_label(layer: int, head: int) -> str:
    """The label mitk uses for a head everywhere (``Attribution.labels`` included)."""
    return f"L{layer}H{head}"


HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")
"""Matches ``head_label``'s output, capturing layer and head."""


def layer_head_heatmap(
    z: Any, layers: Sequence[int], heads: Sequence[int], title: str, **trace: Any
) -> go.Figure:
    """A heatmap with a row per layer, top to bottom, and a column per head.

    ``trace`` holds the heatmap's other settings (colour scale, hover text...).
    """
    fig = go.Figure(
        go.Heatmap(z=z, x=[f"H{h}" for h in heads], y=[f"L{layer}" for layer in layers], **trace)
    )
    fig.update_layout(
        title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed"
    )
    return fig
