"""Attention-pattern heatmaps with the prompt's tokens on both axes and a head selector."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from torch import Tensor

from mitk.cache import ActivationCache
from mitk.errors import ShapeMismatchError
from mitk.shapes import Float
from mitk.viz.axes import check_tokens, head_label, plotly_text, token_axis, unit_scale


def attention_heatmap(
    patterns: Float[Tensor, "head pos key_pos"],
    tokens: Sequence[str],
    *,
    head_labels: Sequence[str] | None = None,
    title: str = "Attention pattern",
) -> go.Figure:
    """Query × key heatmap per head; a dropdown shows one head at a time (the first initially).

    ``patterns[h, q, k]`` is how much query ``q`` attends to key ``k`` in head
    ``h``; ``tokens`` (one per position) label both axes; ``head_labels`` name
    the dropdown entries (default ``head 0``, ``head 1``, ...).
    """
    n_heads, n_query, n_key = patterns.shape
    check_tokens(tokens, n_key, "an attention pattern")
    if n_query != n_key:
        raise ShapeMismatchError(f"patterns must be square per head, got [{n_query}, {n_key}]")
    labels = list(head_labels) if head_labels is not None else [f"head {h}" for h in range(n_heads)]
    if len(labels) != n_heads:
        raise ShapeMismatchError(f"{len(labels)} head labels for {n_heads} patterns")
    grid = patterns.detach().double().cpu()
    positions = list(range(n_key))
    # hover names the tokens, since the tick labels alone may repeat
    names = [plotly_text(repr(token)) for token in tokens]
    hover = [[f"{names[q]} (pos {q}) → {names[k]} (pos {k})" for k in positions] for q in positions]
    fig = go.Figure()
    for h, label in enumerate(labels):
        fig.add_trace(
            go.Heatmap(
                z=grid[h].tolist(),
                x=positions,
                y=positions,
                name=label,
                visible=h == 0,
                hovertext=hover,
                **unit_scale(),
                hovertemplate="%{hovertext}: %{z:.3f}<extra>%{fullData.name}</extra>",
            )
        )
    buttons = [
        {
            "label": label,
            "method": "update",
            "args": [
                {"visible": [h == shown for h in range(n_heads)]},
                {"title.text": f"{title}: {label}"},
            ],
        }
        for shown, label in enumerate(labels)
    ]
    fig.update_layout(
        title=f"{title}: {labels[0]}",
        updatemenus=[
            {
                "type": "dropdown",
                "buttons": buttons,
                "active": 0,
                "x": 1.0,
                "xanchor": "right",
                "y": 1.01,  # just above the plot: needs no more top margin than a title
                "yanchor": "bottom",
            }
        ],
        xaxis={"title": "key", **token_axis(tokens)},
        yaxis={"title": "query", "autorange": "reversed", **token_axis(tokens)},
        height=max(450, min(900, 12 * n_key + 250)),  # room for one tick label per token
    )
    return fig


def cached_attention_heatmap(
    cache: ActivationCache,
    heads: Sequence[tuple[int, int]],
    tokens: Sequence[str],
    *,
    prompt: int = 0,
    title: str = "Attention pattern",
) -> go.Figure:
    """``attention_heatmap`` of the chosen ``(layer, head)`` pairs for one prompt of a cache.

    Reads ``blocks.{layer}.attn.hook_pattern`` (``[batch, head, pos, key_pos]``),
    which must have been cached; nothing is recomputed.
    """
    patterns = [cache["pattern", layer][prompt, head] for layer, head in heads]
    if not patterns:
        raise ShapeMismatchError("choose at least one (layer, head)")
    return attention_heatmap(
        torch.stack(patterns), tokens, head_labels=[head_label(*lh) for lh in heads], title=title
    )
