"""Source nodes' vectors, and their contraction with gradients into rows of the graph.

A source's edge into a target is the target's gradient at the source's
location (its layer's MLP write, or the token embedding, at its position)
dotted with the source's vector: activation times decoder row for a feature,
the error vector for an error node, the embedding for a token. A cross-layer
transcoder's feature writes several layers: its edge is the sum over them.
The vectors writing each layer are grouped by position and zero-padded per
group, so one ``bmm`` per written layer contracts them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.shapes import Float


@dataclass(frozen=True)
class _LayerGroups:
    """One layer's features grouped by position: ``vectors [n_positions, widest, d_model]``.

    ``columns`` are the features' columns in a row (grouped by position,
    ascending), ``flat`` each one's index in the ``[n_positions * widest]``
    products, ``ends[j]`` how many features the first ``j + 1`` positions hold.
    """

    positions: Tensor
    vectors: Tensor
    columns: Tensor
    flat: Tensor
    ends: Tensor


class SourceVectors:
    """Every source's vector, in the graph's node order (features, errors, tokens).

    ``writes[M]`` holds what writes layer ``M``'s MLP output: feature columns
    ``[k]``, their positions ``[k]`` and vectors ``[k, d_model]`` (activation
    times the decoder vector into layer M); a column may write several layers.
    """

    def __init__(
        self,
        n_features: int,
        writes: Sequence[tuple[Tensor, Tensor, Tensor]],  # k differs by layer: shapes unchecked
        errors: Float[Tensor, "n_layers pos d_model"],
        embed: Float[Tensor, "pos d_model"],
    ) -> None:
        self.n_layers, self.n_pos, self.d_model = errors.shape
        self.n_features = n_features
        self.error_start = self.n_features
        self.token_start = self.n_features + self.n_layers * self.n_pos
        self.n_sources = self.token_start + self.n_pos
        self.errors, self.embed = errors, embed
        self.layers = [
            _grouped(positions, vectors, columns) for columns, positions, vectors in writes
        ]

    def contract(self, out: Float[Tensor, "batch n_sources"], layer: int, g: Tensor) -> None:
        """Add into ``out``'s columns of layer ``layer``'s sources from ``g [batch, p, d_model]``.

        ``g`` is the gradient at that layer's MLP writes (``layer == -1``: at the
        token embeddings) on the first ``p`` positions; sources after them keep 0.
        """
        batch, p, _ = g.shape
        if batch == 0:
            return
        if layer == -1:
            out[:, self.token_start : self.token_start + p] = torch.einsum(
                "bpd,pd->bp", g, self.embed[:p]
            )
            return
        start = self.error_start + layer * self.n_pos
        out[:, start : start + p] = torch.einsum("bpd,pd->bp", g, self.errors[layer, :p])
        groups = self.layers[layer]
        reached = int(torch.searchsorted(groups.positions, p))  # positions before p
        if reached == 0:
            return
        at = g[:, groups.positions[:reached]].transpose(0, 1)  # [position, batch, d_model]
        products = torch.bmm(at, groups.vectors[:reached].transpose(1, 2))
        n = int(groups.ends[reached - 1])
        # a cross-layer feature's column sums its writes into every layer
        columns = groups.columns[:n]
        out[:, columns] += products.transpose(0, 1).reshape(batch, -1)[:, groups.flat[:n]]


def _grouped(positions: Tensor, vectors: Tensor, columns: Tensor) -> _LayerGroups:
    """Group one layer's features by position, zero-padding each group to the widest."""
    occupied, which, counts = torch.unique(positions, return_inverse=True, return_counts=True)
    widest = int(counts.max()) if len(counts) else 0
    order = torch.argsort(which, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(which), device=which.device) - starts[which[order]]
    padded = vectors.new_zeros(len(occupied), widest, vectors.shape[-1])
    padded[which[order], rank] = vectors[order]
    return _LayerGroups(
        positions=occupied,
        vectors=padded,
        columns=columns[order],
        flat=which[order] * widest + rank,
        ends=torch.cumsum(counts, 0),
    )
