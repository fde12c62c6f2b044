"""Influence, pruning and scores against a hand-worked graph and a dense oracle on random ones."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk.analysis.graphs import (
    AttributionGraph,
    GraphNodes,
    graph_scores,
    node_influence,
    prune_graph,
    pruning,
)
from mitk.analysis.graphs.influence import RowShares


def graph_of(
    features: list[tuple[int, int, int]], n_layers: int, n_pos: int, adjacency: torch.Tensor,
    probabilities: list[float],
) -> AttributionGraph:  # fmt: skip
    nodes = GraphNodes(
        tokens=torch.arange(n_pos),
        n_layers=n_layers,
        features=torch.tensor(features, dtype=torch.long).reshape(-1, 3),
        activations=torch.ones(len(features)),
        logit_tokens=torch.arange(len(probabilities)),
        logit_probabilities=torch.tensor(probabilities),
    )
    assert adjacency.shape == (nodes.n_nodes, nodes.n_nodes)
    return AttributionGraph(nodes, adjacency, torch.zeros(nodes.n_nodes))


def test_a_hand_worked_chain():
    """token -> feature -> logit, plus an error and the token straight into the logit.

    Nodes: feature 0, error (0, 0), token 0, logit 0. Normalised rows: the
    feature reads the token alone (1); the logit reads 3/5 feature, 1/5 error,
    1/5 token. Influence: feature 0.6, error 0.2, token 0.2 + 0.6 = 0.8.
    """
    adjacency = torch.zeros(4, 4)
    adjacency[0, 2] = 2.0
    adjacency[3, :3] = torch.tensor([3.0, 1.0, -1.0])
    graph = graph_of([(0, 0, 5)], 1, 1, adjacency, [1.0])
    torch.testing.assert_close(node_influence(graph), torch.tensor([0.6, 0.2, 0.8, 0.0]))
    scores = graph_scores(graph)
    assert scores.replacement == pytest.approx(0.8 / (0.8 + 0.2))
    # rows: feature 1 (no error), error 1, token 1, logit 1 - 1/5; reach = influence + weight
    assert scores.completeness == pytest.approx((0.6 + 0.2 + 0.8 + 0.8 * 1.0) / 2.6)
    pruned = prune_graph(graph)
    # ranked: token 0.8, feature 0.6, error 0.2, logit 0 of 1.6; 0.8 of it needs the top two
    torch.testing.assert_close(pruned.cumulative_scores, torch.tensor([1.4 / 1.6, 1.0, 0.5, 1.0]))
    assert pruned.node_mask.tolist() == [True, False, True, True]


def random_graph(
    seed: int, n_layers: int = 3, n_pos: int = 4, per_slot: int = 2
) -> AttributionGraph:
    gen = torch.Generator().manual_seed(seed)
    features = [
        (layer, p, f) for layer in range(n_layers) for p in range(1, n_pos) for f in range(per_slot)
    ]
    n_features, n_logits = len(features), 3
    n = n_features + (n_layers + 1) * n_pos + n_logits
    adjacency = torch.randn(n, n, generator=gen, dtype=torch.float64)
    adjacency *= torch.rand(n, n, generator=gen, dtype=torch.float64) < 0.5  # sparse
    allowed = torch.zeros(n, n, dtype=torch.bool)
    error_layer = torch.arange(n_layers).repeat_interleave(n_pos)
    for t, (layer, _, _) in enumerate(features):
        allowed[t, :n_features] = torch.tensor([f[0] < layer for f in features])
        allowed[t, n_features : n_features + n_layers * n_pos] = error_layer < layer
        allowed[t, n_features + n_layers * n_pos : n - n_logits] = True
    allowed[n - n_logits :, : n - n_logits] = True
    probabilities = torch.tensor([0.6, 0.25, 0.1])
    graph = graph_of(features, n_layers, n_pos, adjacency * allowed, probabilities.tolist())
    return AttributionGraph(graph.nodes, graph.adjacency, graph.target_values)


def oracle_influence(adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w ((I - Â)^-1 - I)`` by a dense solve, in float64."""
    a = adjacency.double().abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-10)
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve((eye - a).T, weights.double()) - weights.double()


def oracle_threshold(scores: list[float], keep: float) -> float:
    ranked = sorted(scores, reverse=True)
    total, running = sum(ranked), 0.0
    for value in ranked:
        running += value
        if running / total >= keep - 1e-12:
            return value
    return ranked[-1]


@settings(max_examples=15)
@given(
    seed=st.integers(0, 10_000),
    node_threshold=st.floats(0.3, 0.95),
    block_rows=st.sampled_from([3, 17, 4096]),
    keep_blocks=st.booleans(),
)
def test_influence_pruning_and_scores_match_a_dense_oracle(
    seed: int, node_threshold: float, block_rows: int, keep_blocks: bool
):
    """Shares are taken a block of rows at a time (one block up to 4096 nodes), kept or
    recomputed per use; any block size, either way, gives the oracle's influence and masks."""
    RowShares.BLOCK_ROWS = block_rows
    RowShares.KEEP_BYTES = 1 << 30 if keep_blocks else 0
    try:
        check_against_the_oracle(seed, node_threshold)
    finally:
        RowShares.BLOCK_ROWS, RowShares.KEEP_BYTES = 4096, 1 << 30


def check_against_the_oracle(seed: int, node_threshold: float) -> None:
    graph = random_graph(seed)
    nodes, adjacency = graph.nodes, graph.adjacency
    weights = torch.zeros(nodes.n_nodes, dtype=torch.float64)
    weights[nodes.logit_start :] = nodes.logit_probabilities.double()
    influence = oracle_influence(adjacency, weights)
    torch.testing.assert_close(node_influence(graph), influence.to(adjacency.dtype))

    # nodes: the most influential until node_threshold, then tokens and logits
    keep = influence >= oracle_threshold(influence.tolist(), node_threshold)
    keep[nodes.token_start :] = True
    pruned_adjacency = adjacency * keep[:, None] * keep[None, :]
    pruned_influence = oracle_influence(pruned_adjacency, weights)
    a = pruned_adjacency.abs()
    share = a / a.sum(1, keepdim=True).clamp_min(1e-10)
    edge_scores = share * (pruned_influence + weights)[:, None]
    edges = edge_scores >= oracle_threshold(edge_scores.flatten().tolist(), 0.98)
    # drop dangling features and errors one at a time until none is left
    changed = True
    while changed:
        changed = False
        for i in range(nodes.token_start):
            reads = edges[:, i].any()
            fed = edges[i].any() if i < nodes.n_features else True
            if keep[i] and not (reads and fed):
                keep[i] = False
                edges[i, :] = False
                edges[:, i] = False
                changed = True
    result = prune_graph(graph, node_threshold=node_threshold)
    assert result.node_mask.tolist() == keep.tolist()
    assert torch.equal(result.edge_mask & keep[:, None] & keep[None, :], edges)
    assert result.kept_nodes == int(keep.sum())
    assert result.kept_edges == int(result.edge_mask.long().sum())

    errors = slice(nodes.error_start, nodes.token_start)
    from_tokens = influence[nodes.token_start : nodes.logit_start].sum()
    replacement = from_tokens / (from_tokens + influence[errors].sum())
    a = adjacency.abs()
    full_share = a / a.sum(1, keepdim=True).clamp_min(1e-10)
    reach = influence + weights
    completeness = ((1 - full_share[:, errors].sum(1)) * reach).sum() / reach.sum()
    scores = graph_scores(graph)
    assert scores.replacement == pytest.approx(float(replacement), abs=1e-9)
    assert scores.completeness == pytest.approx(float(completeness), abs=1e-9)


def test_thresholds_outside_0_1_are_refused_by_name():
    graph = random_graph(0)
    with pytest.raises(ValueError, match="node_threshold"):
        prune_graph(graph, node_threshold=1.5)
    with pytest.raises(ValueError, match="edge_threshold"):
        prune_graph(graph, edge_threshold=-0.1)


def test_a_cycle_is_reported():
    adjacency = torch.zeros(4, 4)
    adjacency[0, 0] = 1.0  # a feature feeding itself
    adjacency[3, 0] = 1.0
    with pytest.raises(RuntimeError, match="cycle"):
        node_influence(graph_of([(0, 0, 1)], 1, 1, adjacency, [1.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8, 0.98])
def test_the_bucketed_threshold_of_many_scores_is_the_sorted_cut(
    seed: int, keep: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SORTED_LIMIT scores the cut is found by buckets: the same score as sorting all of
    them and summing in float64, ties and values spread over many magnitudes included."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.exp(torch.randn(200_000, generator=gen) * 4)  # 1e-7 .. 1e7
    scores[::7] = scores[3]  # ties
    scores[::11] = 0.0
    nonzero = scores[scores != 0]
    ranked = nonzero.double().sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum()
    expected = ranked[int(torch.searchsorted(cumulative, cumulative.new_tensor(keep)))]
    got = pruning._bucketed_threshold(lambda: iter(scores.split(30_000)), keep, all_nonzero=False)
    assert float(got) == float(expected.float())
    # parts are bucketed a piece at a time; pieces that cut parts unevenly change nothing
    monkeypatch.setattr(pruning, "_PIECE", 7_001)
    split = pruning._bucketed_threshold(lambda: iter(scores.split(30_000)), keep, False)
    assert float(split) == float(got)
    # and the in-memory cut, on few enough scores, agrees with both
    assert float(pruning._threshold(scores, keep)) == float(got)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sorted_limit", [1 << 26, 10])
def test_blocks_computed_into_one_reused_buffer_give_the_one_block_masks(
    seed: int, sorted_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recomputed blocks are written into one buffer (the next block overwrites the last),
    and the edge scores into another: each block is still the dense shares' rows, and the
    influence and edge mask are bit for bit those of one block, sorted or bucketed cut."""
    graph = random_graph(seed, per_slot=5)
    n, adjacency = graph.nodes.n_nodes, graph.adjacency.float()  # buckets read float32 bits
    kept = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.8
    kept[graph.nodes.token_start :] = True  # as prune_graph keeps them
    weights = pruning.logit_weights(graph).float()
    monkeypatch.setattr(pruning, "SORTED_LIMIT", sorted_limit)

    def influence_and_edges(block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(RowShares, "BLOCK_ROWS", block_rows)
        monkeypatch.setattr(RowShares, "KEEP_BYTES", 0)
        shares = RowShares(adjacency, kept)
        reach = pruning.influence(shares, weights) + weights
        return reach, pruning._edge_mask(shares, reach, 0.9)

    monkeypatch.setattr(RowShares, "BLOCK_ROWS", 7)
    monkeypatch.setattr(RowShares, "KEEP_BYTES", 0)
    shares = RowShares(adjacency, kept)
    masked = adjacency.abs() * kept[:, None] * kept[None, :]
    dense = masked / masked.sum(-1, keepdim=True).clamp_min(1e-10)
    pointers = set()
    for start, rows in shares.blocks():
        pointers.add(rows.data_ptr())
        assert torch.equal(rows, dense[start : start + rows.shape[0]])  # before the next
    assert len(pointers) == 1 and n > 7
    one_reach, one_edges = influence_and_edges(n)
    for block_rows in (1, 7):
        reach, edges = influence_and_edges(block_rows)
        torch.testing.assert_close(reach, one_reach)  # the blocks' sums round apart
        assert torch.equal(
            pruning._edge_mask(RowShares(adjacency, kept), one_reach, 0.9), one_edges
        )
        assert edges.any() and not edges.all()
