"""Circuit figures: edges drawn in their channel's colour, key-value groups to all their heads."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from mitk.analysis.discovery import Circuit, DiscoveryResult
from mitk.viz.circuit_graph import CHANNEL_NAMES, circuit_graph
from tests.unit.discovery.models import tiny


def test_edges_are_drawn_per_channel_with_scores_on_hover() -> None:
    model = tiny("gqa")  # 4 query heads in 2 key-value groups
    circuit = Circuit.of(
        model, [("embed", "L0H1.q"), ("L0H1", "L1KV1.k"), ("L1H3", "logits"), ("L0_mlp", "L1_mlp")]
    )
    scores = torch.arange(circuit.graph.present.numel(), dtype=torch.float32).view(
        circuit.graph.present.shape
    )
    fig = circuit_graph(DiscoveryResult(circuit, scores, "test"))
    assert isinstance(fig, go.Figure) and "test" in fig.layout.title.text
    by_name = {trace.name: trace for trace in fig.data}
    assert {CHANNEL_NAMES["q"], CHANNEL_NAMES["k"], CHANNEL_NAMES[""]} <= set(by_name)
    # the key-value group L1KV1 is read by query heads 2 and 3: two lines
    assert len([x for x in by_name[CHANNEL_NAMES["k"]].x if x is None]) == 2
    hover = " ".join(t for trace in fig.data if trace.text is not None for t in trace.text)
    assert "L0H1 → L1KV1.k" in hover and "score" in hover
    assert {"embed", "L0H1", "L1H2", "L1H3", "logits"} <= set(by_name["components"].text)


def test_layer_circuits_and_empty_circuits_draw() -> None:
    model = tiny("parallel")
    layers = Circuit.of(model, [("embed", "L0_attn"), ("L0_attn", "L1_mlp")], "layers")
    assert len(circuit_graph(layers).data) >= 2
    assert "0 of" in circuit_graph(Circuit.of(model)).layout.title.text
