"""Influence on the logits through a graph, with circuit-tracer's definitions.

A graph's adjacency is normalised row by row (``|A|`` over each row's sum of
``|A|``), and a node's influence is the logit-probability-weighted sum over
all paths from it to the logits: ``w (Â + Â² + …)``, which ends because the
graph has no cycles. The power series is summed term by term until a term is
exactly zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Float, Int

_ROW_FLOOR = 1e-10


def normalized(adjacency: Float[Tensor, "n m"], floor: float = _ROW_FLOOR) -> Float[Tensor, "n m"]:
    """``|A|`` with each row divided by its sum (at least ``floor``, so empty rows stay zero)."""
    return normalize_(adjacency.abs(), floor)


def normalize_(adjacency: Float[Tensor, "n m"], floor: float = _ROW_FLOOR) -> Float[Tensor, "n m"]:
    """``normalized`` in place: one n x n matrix, not three (an uncapped graph's is gigabytes)."""
    adjacency.abs_()
    return adjacency.div_(adjacency.sum(-1, keepdim=True).clamp_min(floor))


def influence(
    matrix: Float[Tensor, "n n"], weights: Float[Tensor, " n"], max_terms: int | None = None
) -> Float[Tensor, " n"]:
    """``weights @ (M + M² + M³ + …)`` for a nilpotent ``M`` (a graph with no cycles).

    Raises if a term is still non-zero after ``max_terms`` (default: ``n``, the
    longest possible path), which only a cycle can cause.
    """
    limit = matrix.shape[0] if max_terms is None else max_terms
    term = weights @ matrix
    total = term.clone()
    for _ in range(limit):
        if not term.any():
            return total
        term = term @ matrix
        total += term
    if term.any():
        raise RuntimeError(f"influence did not vanish after {limit} terms: the graph has a cycle")
    return total


def partial_influence(
    rows: Float[Tensor, "n_rows n_nodes"],
    row_nodes: Int[Tensor, " n_rows"],
    weights: Float[Tensor, " n_nodes"],
    max_terms: int = 128,
) -> Float[Tensor, " n_nodes"]:
    """Influence through the rows computed so far (``rows[i]`` is node ``row_nodes[i]``'s row).

    What circuit-tracer ranks features by when the graph is capped
    (``max_feature_nodes``): nodes whose rows are not yet known pass nothing on.
    """
    matrix = normalized(rows, floor=1e-8)
    term = weights
    total = torch.zeros_like(weights)
    for _ in range(max_terms):
        term = term[row_nodes] @ matrix
        if not term.any():
            return total
        total += term
    raise RuntimeError(f"partial influence did not vanish after {max_terms} terms")
