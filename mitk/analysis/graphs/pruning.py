"""Pruning a graph to what matters for its logits, and how much of it the features explain.

Circuit-tracer's definitions (``prune_graph`` and ``compute_graph_scores`` of
its ``graph.py``): nodes are kept by influence on the logits until
``node_threshold`` of the total is covered (tokens and logits always stay),
then edges by their share of influence until ``edge_threshold``; features and
errors left without outgoing edges, and features without incoming ones, go
too, repeatedly, until nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.analysis.graphs.influence import RowShares, influence
from mitk.analysis.graphs.nodes import AttributionGraph
from mitk.shapes import Bool, Float


@dataclass(frozen=True)
class GraphPruning:
    """What ``prune_graph`` keeps: ``node_mask [n_nodes]``, ``edge_mask [target, source]``.

    ``cumulative_scores[i]`` is the share of all node influence held by the
    nodes at least as influential as node ``i`` (what the node threshold cuts).
    ``kept_edges`` counts without copying: ``edge_mask.sum()`` makes an int64
    copy, 8 bytes per edge (17 GB for 46,723 nodes).
    """

    node_mask: Bool[Tensor, " n_nodes"]
    edge_mask: Bool[Tensor, "n_nodes n_nodes"]
    cumulative_scores: Float[Tensor, " n_nodes"]

    @property
    def kept_nodes(self) -> int:
        """How many nodes are kept."""
        return int(torch.count_nonzero(self.node_mask))

    @property
    def kept_edges(self) -> int:
        """How many edges are kept."""
        return int(torch.count_nonzero(self.edge_mask))


@dataclass(frozen=True)
class GraphScores:
    """``replacement``: share of token-to-logit influence not through errors; ``completeness``:
    influence-weighted share of node inputs that come from features and tokens, not errors."""

    replacement: float
    completeness: float


def logit_weights(graph: AttributionGraph) -> Float[Tensor, " n_nodes"]:
    """The logit nodes' probabilities, zero at every other node."""
    nodes = graph.nodes
    weights = graph.adjacency.new_zeros(nodes.n_nodes)
    weights[nodes.logit_start :] = nodes.logit_probabilities.to(weights.dtype)
    return weights


def node_influence(graph: AttributionGraph) -> Float[Tensor, " n_nodes"]:
    """Each node's influence on the logits: ``w (Â + Â² + …)`` with rows of ``|A|`` normalised."""
    return influence(RowShares(graph.adjacency), logit_weights(graph))


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> GraphPruning:
    """Masks keeping ``node_threshold`` of node influence, ``edge_threshold`` of edge influence."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    nodes = graph.nodes
    weights = logit_weights(graph)
    scores = node_influence(graph)
    node_mask = scores >= _threshold(scores, node_threshold)
    node_mask[nodes.token_start :] = True  # tokens and logits always stay
    # shares and edge scores a block of rows at a time: an uncapped graph's are gigabytes
    shares = RowShares(graph.adjacency, node_mask)
    reach = influence(shares, weights) + weights
    edge_mask = _edge_mask(shares, reach, edge_threshold)
    inner = slice(0, nodes.token_start)  # features and errors
    features = slice(0, nodes.n_features)

    def drop_dangling() -> None:
        node_mask[inner] &= edge_mask[:, inner].any(0)  # something downstream reads it
        node_mask[features] &= edge_mask[features].any(1)  # something upstream feeds it

    before = node_mask.clone()
    drop_dangling()
    while not torch.equal(node_mask, before):  # each round may leave others dangling
        before = node_mask.clone()
        edge_mask &= node_mask[:, None]
        edge_mask &= node_mask[None, :]
        drop_dangling()
    order = scores.argsort(descending=True)
    cumulative = torch.empty_like(scores)
    cumulative[order] = scores[order].cumsum(0) / scores.sum()
    return GraphPruning(node_mask, edge_mask, cumulative)


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Circuit-tracer's replacement and completeness scores of an (unpruned) graph."""
    nodes = graph.nodes
    weights = logit_weights(graph)
    shares = RowShares(graph.adjacency)
    scores = influence(shares, weights)
    errors = slice(nodes.error_start, nodes.token_start)
    from_tokens = scores[nodes.token_start : nodes.logit_start].sum()
    from_errors = scores[errors].sum()
    replacement = from_tokens / (from_tokens + from_errors)
    not_error = 1 - shares.column_sums(errors)
    reach = scores + weights
    completeness = (not_error * reach).sum() / reach.sum()
    return GraphScores(float(replacement), float(completeness))


def _edge_mask(shares: RowShares, reach: Float[Tensor, " n"], keep: float) -> Bool[Tensor, "n n"]:
    """Edges whose score ``share * reach[target]`` is at least the cut keeping ``keep``."""

    scores: Tensor | None = None  # one block's scores, reused: see RowShares

    def scored() -> Iterator[tuple[int, Tensor]]:
        nonlocal scores
        for start, rows in shares.blocks():
            if scores is None:
                scores = torch.empty_like(rows)  # the first block is the largest
            target_reach = reach[start : start + rows.shape[0], None]
            yield start, torch.mul(rows, target_reach, out=scores[: rows.shape[0]])

    cut = _threshold_of(lambda: (block for _, block in scored()), keep)
    n = reach.shape[0]
    mask = torch.empty((n, shares.adjacency.shape[1]), dtype=torch.bool, device=reach.device)
    for start, block in scored():
        torch.ge(block, cut, out=mask[start : start + block.shape[0]])  # no list, no second copy
    return mask


def _threshold(scores: Float[Tensor, " n"], keep: float) -> Tensor:
    """The smallest score among the top ones whose sum first reaches ``keep`` of the total."""
    return _threshold_of(lambda: iter(scores.split(_PART)), keep)


def _threshold_of(parts: Callable[[], Iterator[Tensor]], keep: float) -> Tensor:
    """``_threshold`` of the scores ``parts()`` yields (called once per pass over them).

    A part may be overwritten by the next one (``_edge_mask`` reuses a buffer),
    so each is used, or copied, before the next is asked for.

    Scores are non-negative; zeros add nothing to the running sum, so only the
    non-zero ones are sorted (most edges are zero), and a cut that falls past
    them lands on a zero, as it would with the zeros sorted in. Beyond
    ``SORTED_LIMIT`` non-zero scores (an uncapped graph's edges), see
    ``_bucketed_threshold``.
    """
    n_nonzero, n_scores = 0, 0
    for part in parts():
        n_nonzero += int(torch.count_nonzero(part))
        n_scores += part.numel()
    if n_nonzero == 0:
        return torch.zeros(())
    if n_nonzero > SORTED_LIMIT:
        return _bucketed_threshold(parts, keep, n_nonzero == n_scores)
    ranked = torch.cat([part[part != 0] for part in parts()]).sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum()
    at = int(torch.searchsorted(cumulative, cumulative.new_tensor(keep)))
    if at < len(ranked):
        return ranked[at]
    return ranked.new_zeros(()) if n_nonzero < n_scores else ranked[-1]


SORTED_LIMIT = 1 << 26
"""Non-zero scores sorted whole at most: past this, ``_bucketed_threshold`` finds the cut."""
_PART = 1 << 24  # scores scanned this many at a time
_PIECE = 1 << 22  # and bucketed this many at a time
_BUCKET_SHIFT = 15  # float32 bits >> 15: sign, exponent and 8 mantissa bits, in value order


def _bucketed_threshold(
    parts: Callable[[], Iterator[Tensor]], keep: float, all_nonzero: bool
) -> Tensor:
    """``_threshold`` without sorting every score: the same cut, summed in float64.

    Positive float32 values order as their bit patterns do, so the top bits
    bucket them in order; per-bucket sums (float64, one pass over the parts)
    find the bucket where the running sum from the top crosses ``keep`` of the
    total, and a second pass sorts only that bucket's scores. (A float32 running
    sum over hundreds of millions of scores, what sorting them all would use,
    is further from exact.)
    """
    sums = torch.zeros(1 << (31 - _BUCKET_SHIFT), dtype=torch.float64)
    smallest = float("inf")
    for part in parts():
        for piece in part.reshape(-1).split(_PIECE):  # bounds the float64 and index copies
            nonzero = piece[piece != 0]
            if nonzero.numel():
                sums.index_add_(0, nonzero.view(torch.int32) >> _BUCKET_SHIFT, nonzero.double())
                smallest = min(smallest, float(nonzero.min()))
    total = float(sums.sum())
    from_top = sums.flip(0).cumsum(0)  # running sum over buckets, largest values first
    crossing = int(torch.searchsorted(from_top, from_top.new_tensor(keep * total)))
    if crossing >= len(from_top):  # rounding left the total just short: the smallest score
        return torch.tensor(smallest if all_nonzero else 0.0)
    bucket = len(sums) - 1 - crossing
    above = float(from_top[crossing - 1]) if crossing > 0 else 0.0
    inside = torch.cat([
        piece[(piece != 0) & ((piece.view(torch.int32) >> _BUCKET_SHIFT) == bucket)]
        for part in parts() for piece in part.reshape(-1).split(_PIECE)
    ]).double().sort(descending=True).values  # fmt: skip
    cumulative = (above + inside.cumsum(0)) / total
    at = min(int(torch.searchsorted(cumulative, cumulative.new_tensor(keep))), len(inside) - 1)
    return inside[at].float()
