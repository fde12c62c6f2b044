"""The graph viewer page: the pruned graph in its JSON, laid out, offline, the same every time."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
import re
from typing import Any

import pytest

from mitk.analysis.graphs import attribution_graph, node_influence, prune_graph
from mitk.viz.attribution_graph import DATA_ID, graph_viewer, graph_viewer_html
from tests.unit.graphs.models import model, prompt, transcoders

BUILT = model()
GRAPH = attribution_graph(BUILT, transcoders(BUILT), prompt())
TOKENS = [f"t{i}" for i in range(GRAPH.nodes.n_pos)]
DATA = re.compile(rf"<script type='application/json' id='{DATA_ID}'>(.*?)</script>", re.DOTALL)


def embedded(page: str) -> dict:
    found = DATA.findall(page)
    assert len(found) == 1
    return json.loads(found[0])


def test_the_page_holds_every_pruned_node_and_edge_and_nothing_else():
    data = embedded(graph_viewer_html(GRAPH, token_strings=TOKENS))
    pruned = prune_graph(GRAPH)
    assert pruned.edge_mask.any() and not pruned.node_mask.all()  # pruning did something
    assert [node["id"] for node in data["nodes"]] == pruned.node_mask.nonzero()[:, 0].tolist()
    edges = {(e["target"], e["source"]): e["weight"] for e in data["edges"]}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    assert set(edges) == set(zip(targets.tolist(), sources.tolist(), strict=True))
    for (target, source), weight in edges.items():
        assert weight == pytest.approx(float(GRAPH.adjacency[target, source]), rel=1e-5)
    weights = [abs(e["weight"]) for e in data["edges"]]
    assert weights == sorted(weights)  # strongest drawn last, on top


def test_nodes_say_what_they_are_and_sit_by_layer_and_position():
    nodes = GRAPH.nodes
    data = embedded(graph_viewer_html(GRAPH, token_strings=TOKENS, vocab_strings=[
        f"v{i}" for i in range(40)]))  # fmt: skip
    influence = node_influence(GRAPH)
    by_kind: dict[str, list[dict]] = {}
    for node in data["nodes"]:
        by_kind.setdefault(node["kind"], []).append(node)
        assert node["token"] == TOKENS[node["pos"]]
        assert node["influence"] == pytest.approx(float(influence[node["id"]]), rel=1e-5, abs=1e-12)
        assert node["column"][0] <= node["x"] <= node["column"][1]
    assert data["rows"] == ["tokens", "layer 0", "layer 1", "layer 2", "logits"]
    assert [n["row"] for n in by_kind["token"]] == [0] * nodes.n_pos  # embeddings at the bottom
    assert {n["row"] for n in by_kind["logit"]} == {nodes.n_layers + 1}  # logits at the top
    for node in by_kind["feature"]:
        layer, pos, feature = nodes.features[node["id"]].tolist()
        assert (node["layer"], node["pos"], node["feature"]) == (layer, pos, feature)
        assert node["row"] == layer + 1
        assert node["activation"] == pytest.approx(float(nodes.activations[node["id"]]), rel=1e-5)
    logits = by_kind["logit"]
    assert [n["label"] for n in logits] == [f"v{t}" for t in nodes.logit_tokens.tolist()]
    assert logits[0]["probability"] == pytest.approx(float(nodes.logit_probabilities[0]))
    # columns follow positions left to right; no two nodes share a place
    columns = {n["pos"]: tuple(n["column"]) for n in data["nodes"]}
    spans = [columns[pos] for pos in sorted(columns)]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    places = [(n["row"], n["x"]) for n in data["nodes"]]
    assert len(set(places)) == len(places)


def test_examples_and_logit_effects_ride_along_for_the_features_shown():
    shown = [n for n in embedded(graph_viewer_html(GRAPH))["nodes"] if n["kind"] == "feature"]
    key = (shown[0]["layer"], shown[0]["feature"])
    examples = {key: [("the cat sat", 2.5), ("on a mat", 1.25)], (0, 10**6): [("never", 1.0)]}
    effects = {key: [(" mat", 0.75), (" dog", -0.5)]}
    data = embedded(graph_viewer_html(GRAPH, examples=examples, logit_effects=effects))
    assert data["features"] == {
        f"{key[0]}:{key[1]}": {
            "examples": [["the cat sat", 2.5], ["on a mat", 1.25]],
            "logit_effects": [[" mat", 0.75], [" dog", -0.5]],
        }
    }


def test_the_page_is_self_contained_deterministic_and_escapes_its_text(tmp_path: Path):
    hostile = ["</script><script>alert(1)</script>", *TOKENS[1:]]
    options: dict[str, Any] = {"token_strings": hostile, "header": {"model": "<b>m</b>"}}
    options["title"] = "g & h"
    page = graph_viewer_html(GRAPH, **options)
    assert page == graph_viewer_html(GRAPH, **options)
    assert "http" not in page and " src=" not in page and "<link" not in page  # loads nothing
    assert page.count("<script") == 2 and "<b>m</b>" not in page
    assert embedded(page)["tokens"][0] == hostile[0]  # escaped in the page, intact in the data
    path = graph_viewer(tmp_path / "graph.html", GRAPH, **options)
    assert path.read_text(encoding="utf-8") == page


def test_thresholds_change_what_is_shown_and_bad_inputs_are_refused():
    everything = embedded(graph_viewer_html(GRAPH, node_threshold=1.0, edge_threshold=1.0))
    default = embedded(graph_viewer_html(GRAPH))
    assert len(everything["edges"]) > len(default["edges"])
    with pytest.raises(ValueError, match="token_strings has 2 entries"):
        graph_viewer_html(GRAPH, token_strings=["a", "b"])
    with pytest.raises(ValueError, match="node_threshold"):
        graph_viewer_html(GRAPH, node_threshold=1.5)
