"""Circuits: built by hand, refused by name when wrong, saved and validated on reading, compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mitk.analysis.discovery import Circuit, CircuitFileError, Edge, EdgeGraph
from tests.unit.discovery.models import tiny


def test_graph_nodes_and_edges_follow_the_forward() -> None:
    graph = EdgeGraph.of(tiny("mha"))
    assert graph.senders[:2] == ("embed", "L0H0") and "L2_mlp" in graph.senders
    assert graph.receivers[-1] == "logits" and "L1H3.k" in graph.receivers
    edges = set(graph.edges())
    assert ("L0H1", "L1H2.q") in edges and ("L0H1", "L0_mlp") in edges
    assert ("L1H0", "L0H0.q") not in edges and ("L1H0", "L1H2.v") not in edges
    assert graph.n_edges == sum(int(graph.present[s].sum()) for s in range(len(graph.senders)))


def test_grouped_query_attention_has_one_key_value_receiver_per_group() -> None:
    graph = EdgeGraph.of(tiny("gqa"))  # 4 query heads, 2 key-value heads
    layer0 = [r for r in graph.receivers if r.startswith("L0") and "." in r]
    assert layer0 == ["L0H0.q", "L0H1.q", "L0H2.q", "L0H3.q", "L0KV0.k", "L0KV1.k",
                      "L0KV0.v", "L0KV1.v"]  # fmt: skip
    circuit = Circuit.of(tiny("gqa"), [("L0H2", "L1KV1.k")])
    assert ("L0H2", "L1KV1.k") in circuit


def test_parallel_blocks_have_no_edge_from_attention_to_its_own_mlp() -> None:
    edges = set(EdgeGraph.of(tiny("parallel")).edges())
    assert ("L0H0", "L0_mlp") not in edges and ("L0H0", "L1_mlp") in edges


def test_layer_granularity_coarsens_the_head_graph() -> None:
    model = tiny("mha")
    graph = EdgeGraph.of(model, "layers")
    assert graph.senders == ("embed", "L0_attn", "L0_mlp", "L1_attn", "L1_mlp", "L2_attn", "L2_mlp")
    mask = Circuit.of(model, [("L0_attn", "L1_attn")], "layers").mask()
    fine = graph.fine_mask(mask)
    heads = EdgeGraph.of(model)
    kept = {(heads.senders[s], heads.receivers[r]) for s, r in fine.nonzero().tolist()}
    assert ("L0H2", "L1H3.k") in kept and ("L0H0", "L1H0.q") in kept
    assert len(kept) == 4 * 12 and not any(s == "embed" for s, _ in kept)


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        (("L0H9", "logits"), "unknown sender 'L0H9'"),
        (("L0H0", "L0H1.q"), "writes after it reads"),
        (("embed", "L1H0.x"), "unknown receiver 'L1H0.x'"),
        (("embed", "logits", -1), "non-negative"),
    ],
)
def test_impossible_edges_are_refused_by_name(edge: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Circuit.of(tiny("mha"), [edge])


def test_compare_and_random() -> None:
    model = tiny("mha")
    a = Circuit.of(model, [("embed", "logits"), ("L0H0", "L1H0.q"), ("L1_mlp", "logits")])
    b = Circuit.of(model, [("embed", "logits"), ("L2H1", "logits")])
    assert (a & b).edges == {Edge("embed", "logits")} and len(a | b) == 4
    assert a.precision_recall(b) == (1 / 3, 1 / 2)
    graph = a.graph
    r1, r2 = Circuit.random(graph, 7, seed=3), Circuit.random(graph, 7, seed=3)
    assert r1 == r2 and len(r1) == 7 and r1 != Circuit.random(graph, 7, seed=4)
    with pytest.raises(ValueError, match="different graphs"):
        a & Circuit.of(tiny("gqa"))


def test_top_keeps_the_largest_scores_of_existing_edges() -> None:
    graph = EdgeGraph.of(tiny("attn_only"))
    scores = torch.zeros(graph.present.shape)
    s, r = graph.edge_index("L0H1", "L1H2.v")
    scores[s, r] = -5.0
    scores[graph.senders.index("L1H0"), graph.receivers.index("L0H0.q")] = 100.0  # not an edge
    top = Circuit.top(graph, scores, 1)
    assert top.edges == {Edge("L0H1", "L1H2.v")}


def test_positional_edges_mask_only_their_position() -> None:
    model = tiny("mha")
    circuit = Circuit.of(model, [("embed", "logits", 2), ("L0H0", "logits")])
    mask = circuit.mask(seq=4)
    s, r = circuit.graph.edge_index("embed", "logits")
    assert mask[:, s, r].tolist() == [0.0, 0.0, 1.0, 0.0]
    s, r = circuit.graph.edge_index("L0H0", "logits")
    assert mask[:, s, r].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="seq="):
        circuit.mask()


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny("gqa")
    circuit = Circuit.of(model, [("embed", "L0KV1.v"), ("L0H3", "logits", 3)])
    assert Circuit.load(circuit.save(tmp_path / "c.json")) == circuit
    layers = Circuit.of(model, [("L0_mlp", "L1_attn")], "layers")
    assert Circuit.load(layers.save(tmp_path / "l.json")) == layers


def _valid() -> dict:
    return Circuit.of(tiny("mha"), [("embed", "logits"), ("L0H0", "L1H1.k", 2)]).to_dict()


def _set(path: list, value: object) -> dict:
    data = _valid()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        ("not json {", "Expecting"),
        ([1, 2], "format"),
        (_set(["format"], "other"), "format"),
        (_set(["version"], 2), "version"),
        (_set(["granularity"], "neurons"), "granularity"),
        (_set(["shape"], None), "shape must be an object"),
        (_set(["shape", "n_layers"], True), "shape.n_layers"),
        (_set(["shape", "n_heads"], 0), "shape.n_heads"),
        (_set(["shape", "n_heads"], 10**9), "shape.n_heads"),
        (_set(["shape", "n_key_value_heads"], 3), "multiple"),
        (_set(["shape", "has_mlp"], 1), "shape.has_mlp"),
        (_set(["edges"], {"a": 1}), "edges must be a list"),
        (_set(["edges"], [["embed"]]), r"edges\[0\]"),
        (_set(["edges"], [["embed", "logits", 1.5]]), r"edges\[0\]"),
        (_set(["edges"], [["embed", "logits", True]]), r"edges\[0\]"),
        (_set(["edges"], [["embed", 3]]), r"edges\[0\]"),
        (_set(["edges"], [["L9H0", "logits"]]), "unknown sender"),
        (_set(["edges"], [["L2H0", "L1H0.q"]]), "writes after it reads"),
    ],
)
def test_damaged_files_are_refused_naming_file_and_fault(
    tmp_path: Path, data: object, fault: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(CircuitFileError, match=fault) as info:
        Circuit.load(path)
    assert str(path) in str(info.value)


def test_binary_and_missing_files_are_circuit_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CircuitFileError, match=r"bin\.json"):
        Circuit.load(path)
    with pytest.raises(CircuitFileError, match=r"missing\.json"):
        Circuit.load(tmp_path / "missing.json")
