"""Direct logit attribution and logit-lens figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import plotly.graph_objects as go
import torch
from torch import Tensor

from mitk.analysis.dla import Attribution
from mitk.analysis.lens import LogitLens
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.shapes import Int
from mitk.viz.axes import (
    HEAD_LABEL,
    check_tokens,
    head_label,
    layer_head_heatmap,
    plotly_text,
    raw_scale,
    token_axis,
)

VERTICAL_BARS_MAX = 8
"""More components than this (or long labels) get horizontal bars, so no label collides."""
VERTICAL_LABEL_CHARS = 60
"""Vertical bars only while the labels total at most this many characters."""


def _per_component(attribution: Attribution, prompt: int | None) -> tuple[Tensor, str]:
    values = attribution.values.detach().float().cpu()
    if prompt is None:
        return values.mean(1), f"mean over {values.shape[1]} prompts"
    return values[:, prompt], f"prompt {prompt}"


def _target(answer: str | None, wrong: str | None) -> str:
    if answer is None:
        return "logit (difference)"
    target = f"logit({answer!r})" + (f" − logit({wrong!r})" if wrong is not None else "")
    return plotly_text(target)


def _horizontal(labels: Sequence[str]) -> bool:
    """Whether bars for ``labels`` read better lying down: many, or long, labels."""
    return len(labels) > VERTICAL_BARS_MAX or sum(map(len, labels)) > VERTICAL_LABEL_CHARS


def dla_bar(
    attribution: Attribution,
    prompt: int | None = None,
    *,
    answer: str | None = None,
    wrong: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Bars of direct logit attribution per component (mean over prompts unless one is chosen).

    ``attribution.labels`` label the bars; ``answer``/``wrong`` name the tokens
    whose logit (difference) was attributed, for the axis title. More than
    ``VERTICAL_BARS_MAX`` components (or long labels) are drawn as horizontal
    bars, first component at the top, so every label has a line of its own.
    """
    series, which = _per_component(attribution, prompt)
    values, labels = series.tolist(), [plotly_text(label) for label in attribution.labels]
    colours = ["#c0392b" if v < 0 else "#2471a3" for v in values]
    component = {"title": "component", "type": "category"}  # labels like "0" stay names
    contribution = {"title": f"contribution to {_target(answer, wrong)}", "zeroline": True}
    fig = go.Figure()
    if _horizontal(labels):
        fig.add_trace(go.Bar(x=values, y=labels, orientation="h", marker_color=colours))
        fig.update_layout(
            xaxis=contribution,
            yaxis={**component, "autorange": "reversed", "automargin": True},
            height=max(400, 22 * len(labels) + 160),
        )
    else:
        fig.add_trace(go.Bar(x=labels, y=values, marker_color=colours))
        fig.update_layout(xaxis=component, yaxis=contribution)
    fig.update_layout(
        title=title or f"Direct logit attribution to {_target(answer, wrong)} ({which})"
    )
    return fig


def dla_head_heatmap(
    attribution: Attribution, prompt: int | None = None, *, title: str | None = None
) -> go.Figure:
    """Layer × head heatmap of the per-head rows (``by="head"``), diverging around 0."""
    series, which = _per_component(attribution, prompt)
    heads = {}
    for label, value in zip(attribution.labels, series.tolist(), strict=True):
        if match := HEAD_LABEL.match(label):
            heads[int(match[1]), int(match[2])] = value
    if not heads:
        raise ConfigError("no per-head rows in this attribution; compute it with by='head'")
    n_layers = 1 + max(layer for layer, _ in heads)
    n_heads = 1 + max(head for _, head in heads)
    grid = [
        [heads.get((layer, h), float("nan")) for h in range(n_heads)] for layer in range(n_layers)
    ]
    return layer_head_heatmap(
        grid,
        range(n_layers),
        range(n_heads),
        title or f"Direct logit attribution per head ({which})",
        **raw_scale(),
        hovertext=[[head_label(layer, h) for h in range(n_heads)] for layer in range(n_layers)],
    )


def snapshot_label(label: str, labels: Sequence[str]) -> str:
    """A readable name for a ``LogitLens`` label: ``"1_pre"`` → ``"after block 0"``.

    ``"0_pre"`` is the embeddings, ``"{L}_pre"`` the stream after block ``L - 1``
    and ``"final_post"`` the stream after the last block (``labels`` tell which).
    Labels of any other form are returned as they are.
    """
    if label == "0_pre":
        return "embeddings (before block 0)"
    if label.endswith("_pre") and label[:-4].isdigit():
        return f"after block {int(label[:-4]) - 1}"
    if label == "final_post":
        blocks = [
            int(other[:-4]) for other in labels if other.endswith("_pre") and other[:-4].isdigit()
        ]
        return f"after block {max(blocks)} (final)" if blocks else "final"
    return label


def logit_lens_heatmap(
    lens: LogitLens,
    targets: Int[Tensor, "batch pos"],
    *,
    prompt: int | None = 0,
    metric: Literal["rank", "logit"] = "rank",
    tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Snapshot × position heatmap of the rank (0 = top) or logit of ``targets[b, p]``.

    ``targets`` must cover every position of the lens (e.g. each position's next
    token; slice ``lens.logits`` first to drop positions without one). ``prompt``
    picks one row of the batch; ``None`` averages over prompts. ``tokens``
    labels the position axis.
    """
    if metric not in ("rank", "logit"):
        raise ConfigError(f"metric must be 'rank' or 'logit', got {metric!r}")
    if tuple(targets.shape) != tuple(lens.logits.shape[1:3]):
        raise ShapeMismatchError(
            f"targets {tuple(targets.shape)} must match the lens's [batch, pos] "
            f"{tuple(lens.logits.shape[1:3])}"
        )
    with torch.no_grad():
        per_token = lens.token_ranks(targets) if metric == "rank" else lens.token_logits(targets)
    values = per_token.detach().double().cpu()  # [layer, batch, pos]
    grid = values[:, prompt] if prompt is not None else values.mean(1)
    check_tokens(tokens, grid.shape[1], "the logit lens")
    scale = {"colorscale": "Viridis_r", "zmin": 0} if metric == "rank" else raw_scale()
    fig = go.Figure(
        go.Heatmap(
            z=grid.tolist(),
            x=list(range(grid.shape[1])),
            y=[snapshot_label(label, lens.labels) for label in lens.labels],
            colorbar={"title": metric},
            **scale,
        )
    )
    which = f"prompt {prompt}" if prompt is not None else f"mean over {values.shape[1]} prompts"
    fig.update_layout(
        title=title or f"Logit lens: {metric} of the target token after each layer ({which})",
        xaxis={"title": "position", **(token_axis(tokens) if tokens is not None else {})},
        yaxis={"title": "residual stream", "autorange": "reversed", "automargin": True},
    )
    return fig
