"""Influence on the logits through a graph, with circuit-tracer's definitions.

A graph's adjacency is normalised row by row (``|A|`` over each row's sum of
``|A|``), and a node's influence is the logit-probability-weighted sum over
all paths from it to the logits: ``w (Â + Â² + …)``, which ends because the
graph has no cycles. The power series is summed term by term until a term is
exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mitk.shapes import Bool, Float, Int

_ROW_FLOOR = 1e-10


def normalized(adjacency: Float[Tensor, "n m"], floor: float = _ROW_FLOOR) -> Float[Tensor, "n m"]:
    """``|A|`` with each row divided by its sum (at least ``floor``, so empty rows stay zero)."""
    magnitude = adjacency.abs()
    return magnitude.div_(magnitude.sum(-1, keepdim=True).clamp_min(floor))


class RowShares:
    """``normalized(A * kept_rows * kept_cols)``, applied a block of rows at a time.

    An uncapped graph's adjacency is gigabytes; its normalised copy would be as
    large again. Each block is normalised as ``normalized`` would (the same
    numbers); ``vecmat`` sums the blocks' products, so only a graph of more
    than ``BLOCK_ROWS`` nodes differs from one product, in float rounding.

    Blocks computed per use are written into one buffer, allocated once: a
    fresh block each time (hundreds of megabytes, dozens of passes for one
    ``influence``) is mapped and unmapped by the allocator and faults its pages
    in again on every use, which costs more system time than the arithmetic.
    """

    BLOCK_ROWS = 4096
    KEEP_BYTES = 1 << 30
    """Shares of a matrix up to this size are computed once and kept; larger ones per use."""

    def __init__(self, adjacency: Float[Tensor, "n n"], kept: Bool[Tensor, " n"] | None = None):
        self.adjacency = adjacency
        self.kept = None if kept is None else kept.to(adjacency.dtype)
        n, m = adjacency.shape
        self._buffer = adjacency.new_empty((min(self.BLOCK_ROWS, n), m))
        self.row_sums = torch.cat(
            [self._masked(start, self._buffer).sum(-1) for start in self._starts()]
        )
        self._kept_blocks: list[tuple[int, Tensor]] | None = None
        if adjacency.numel() * adjacency.element_size() <= self.KEEP_BYTES:
            self._kept_blocks = [
                (start, self._normalised(start, torch.empty_like(self._rows(start))))
                for start in self._starts()
            ]

    def _starts(self) -> range:
        return range(0, self.adjacency.shape[0], self.BLOCK_ROWS)

    def _rows(self, start: int) -> Tensor:
        return self.adjacency[start : start + self.BLOCK_ROWS]

    def _masked(self, start: int, out: Tensor) -> Tensor:
        """``|A| * kept`` of the block from row ``start``, written into the head of ``out``."""
        rows = self._rows(start)
        rows = torch.abs(rows, out=out[: rows.shape[0]])
        if self.kept is not None:
            rows.mul_(self.kept[start : start + self.BLOCK_ROWS, None]).mul_(self.kept[None, :])
        return rows

    def _normalised(self, start: int, out: Tensor) -> Tensor:
        rows = self._masked(start, out)
        return rows.div_(self.row_sums[start : start + rows.shape[0], None].clamp_min(_ROW_FLOOR))

    def blocks(self) -> Iterator[tuple[int, Float[Tensor, "block n"]]]:
        """``(first row, normalised rows)`` for each block of rows, in order (read-only).

        The rows may be a view of a buffer that the next block overwrites: use
        each block before asking for the next, and copy what must outlive it.
        """
        if self._kept_blocks is not None:
            return iter(self._kept_blocks)
        return ((start, self._normalised(start, self._buffer)) for start in self._starts())

    def vecmat(self, vector: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        """``vector @ shares``."""
        out = vector.new_zeros(self.adjacency.shape[1])
        for start, rows in self.blocks():
            out += vector[start : start + rows.shape[0]] @ rows
        return out

    def column_sums(self, columns: slice) -> Float[Tensor, " n"]:
        """Each row's shares summed over ``columns``."""
        return torch.cat([rows[:, columns].sum(-1) for _, rows in self.blocks()])


def influence(
    shares: RowShares, weights: Float[Tensor, " n"], max_terms: int | None = None
) -> Float[Tensor, " n"]:
    """``weights @ (S + S² + S³ + …)`` for the shares ``S`` of a graph with no cycles.

    Raises if a term is still non-zero after ``max_terms`` (default: ``n``, the
    longest possible path), which only a cycle can cause.
    """
    limit = weights.shape[0] if max_terms is None else max_terms
    term = shares.vecmat(weights)
    total = term.clone()
    for _ in range(limit):
        if not term.any():
            return total
        term = shares.vecmat(term)
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
