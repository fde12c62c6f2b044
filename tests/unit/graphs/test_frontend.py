"""The frontend JSON: circuit-tracer's node ids and fields, the pruned edges, a file on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mitk.analysis.graphs import (
    attribution_graph,
    frontend_json,
    prune_graph,
    write_frontend_json,
)
from tests.unit.graphs.models import model, prompt, transcoders

BUILT = model()
GRAPH = attribution_graph(BUILT, transcoders(BUILT), prompt())
FIELDS = {
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
    "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation",
}  # fmt: skip


def test_nodes_and_links_are_the_pruned_graph_with_circuit_tracers_ids():
    data = frontend_json(GRAPH, slug="s", token_strings=[f"t{i}" for i in range(9)])
    nodes = GRAPH.nodes
    pruned = prune_graph(GRAPH)
    by_id = {node["node_id"]: node for node in data["nodes"]}
    assert all(set(node) == FIELDS for node in data["nodes"])
    kinds = [node["feature_type"] for node in data["nodes"]]
    assert kinds.count("embedding") == nodes.n_pos and kinds.count("logit") == nodes.n_logits
    # every link is a kept edge with its weight, between nodes that are written
    assert len(data["links"]) == int(pruned.edge_mask.sum())
    index = {}
    for i in pruned.node_mask.nonzero()[:, 0].tolist():
        if i < nodes.n_features:
            layer, pos, feature = nodes.features[i].tolist()
            index[f"{layer}_{feature}_{pos}"] = i
        elif i < nodes.token_start:
            layer, pos = divmod(i - nodes.n_features, nodes.n_pos)
            index[f"{layer}_-1_{pos}"] = i
        elif i < nodes.logit_start:
            pos = i - nodes.token_start
            index[f"E_{int(nodes.tokens[pos])}_{pos}"] = i
        else:
            rank = i - nodes.logit_start
            index[f"{nodes.n_layers + 1}_{int(nodes.logit_tokens[rank])}_{nodes.n_pos - 1}"] = i
    for link in data["links"]:
        assert link["source"] in by_id and link["target"] in by_id
        target, source = index[link["target"]], index[link["source"]]
        assert pruned.edge_mask[target, source]
        assert link["weight"] == pytest.approx(float(GRAPH.adjacency[target, source]))
    feature = next(
        node for node in data["nodes"] if node["feature_type"] == "cross layer transcoder"
    )
    layer, feat = int(feature["layer"]), int(feature["node_id"].split("_")[1])
    assert feature["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
    assert feature["activation"] > 0
    top = next(node for node in data["nodes"] if node["is_target_logit"])
    assert top["token_prob"] == pytest.approx(float(nodes.logit_probabilities[0]))
    assert data["metadata"]["prompt_tokens"][0] == "t0" and data["metadata"]["schema_version"] == 1


def test_the_file_is_the_same_json_and_bad_token_strings_are_refused(tmp_path: Path):
    path = write_frontend_json(GRAPH, tmp_path / "graph.json", slug="g")
    assert json.loads(path.read_text()) == json.loads(json.dumps(frontend_json(GRAPH, slug="g")))
    with pytest.raises(ValueError, match="token_strings has 2 entries"):
        frontend_json(GRAPH, token_strings=["a", "b"])
