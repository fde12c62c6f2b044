"""A circuit drawn as a graph: components in forward order, edges coloured by the input they feed.

Columns follow the forward: ``embed``, each layer's heads (or its attention
at layer granularity), its MLP, the ``logits``. An edge into a head's query,
key or value input is drawn to that head in the colour of the channel; an
edge into a key-value group's input (grouped-query attention) is drawn to
every query head of the group. With scores, hovering an edge's midpoint
shows its score.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from torch import Tensor

from mitk.analysis.discovery.circuit import Circuit
from mitk.analysis.discovery.graph import EdgeGraph
from mitk.analysis.discovery.result import DiscoveryResult

CHANNEL_COLOURS = {"q": "#1f77b4", "k": "#d62728", "v": "#2ca02c", "": "#7f7f7f"}
CHANNEL_NAMES = {"q": "query input", "k": "key input", "v": "value input", "": "stream input"}


def _place(node: str, graph: EdgeGraph) -> tuple[float, float]:
    """(x, y) of a component: x is when it runs, y spreads the heads of one layer."""
    shape = graph.shape
    if node == "embed":
        return -1.0, 0.0
    if node == "logits":
        return float(shape.n_layers), 0.0
    layer_text, _, rest = node[1:].partition("H")
    if rest:  # a head
        middle = (shape.n_heads - 1) / 2
        return float(layer_text), float(rest) - middle
    layer, _, kind = node[1:].partition("_")
    offset = 0.0 if shape.parallel_attn_mlp or kind == "attn" else 0.5
    y = -(shape.n_heads + 1) / 2 if kind == "mlp" and shape.parallel_attn_mlp else 0.0
    return float(layer) + offset, y


def _targets(receiver: str, graph: EdgeGraph) -> tuple[list[str], str]:
    """The drawn nodes a receiver belongs to, and its channel (``""`` for a whole input)."""
    node, _, channel = receiver.partition(".")
    if "KV" in node:
        layer, group = node[1:].split("KV")
        size = graph.shape.group
        heads = range(int(group) * size, (int(group) + 1) * size)
        return [f"L{layer}H{h}" for h in heads], channel
    return [node], channel


def circuit_graph(
    circuit: Circuit | DiscoveryResult, title: str | None = None, scores: Tensor | None = None
) -> go.Figure:
    """A plotly figure of ``circuit`` (a ``DiscoveryResult`` draws its circuit with its scores)."""
    if isinstance(circuit, DiscoveryResult):
        scores = circuit.scores if scores is None else scores
        title = title or f"Circuit found by {circuit.method}"
        circuit = circuit.circuit
    graph = circuit.graph
    fig = go.Figure()
    lines: dict[str, tuple[list[float | None], list[float | None]]] = {}
    mid_x, mid_y, mid_text = [], [], []
    for edge in sorted(circuit.edges):
        x0, y0 = _place(edge.sender, graph)
        targets, channel = _targets(edge.receiver, graph)
        xs, ys = lines.setdefault(channel, ([], []))
        score = None
        if scores is not None:
            value = float(scores[graph.edge_index(edge.sender, edge.receiver)])
            score = None if math.isnan(value) else value
        for target in targets:
            x1, y1 = _place(target, graph)
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            mid_x.append((x0 + x1) / 2)
            mid_y.append((y0 + y1) / 2)
            where = "" if edge.pos is None else f" @pos {edge.pos}"
            extra = "" if score is None else f"<br>score {score:.4g}"
            mid_text.append(f"{edge.sender} → {edge.receiver}{where}{extra}")
    for channel, (xs, ys) in sorted(lines.items()):
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=CHANNEL_NAMES[channel],
                hoverinfo="skip",
                line={"color": CHANNEL_COLOURS[channel], "width": 2},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=mid_x,
            y=mid_y,
            mode="markers",
            marker={"size": 6, "opacity": 0.01},
            text=mid_text,
            hoverinfo="text",
            showlegend=False,
        )
    )
    drawn = sorted({n for e in circuit.edges for n in [e.sender, *_targets(e.receiver, graph)[0]]})
    places = [_place(n, graph) for n in drawn]
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in places],
            y=[p[1] for p in places],
            mode="markers+text",
            text=drawn,
            textposition="top center",
            name="components",
            marker={"size": 14, "color": "#ffffff", "line": {"color": "#333333", "width": 2}},
        )
    )
    fig.update_layout(
        title=title or f"Circuit: {len(circuit)} of {graph.n_edges} edges",
        xaxis={"title": "layer", "zeroline": False, "dtick": 1},
        yaxis={"visible": False},
        plot_bgcolor="white",
    )
    return fig
