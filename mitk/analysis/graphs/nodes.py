"""The nodes of an attribution graph, in circuit-tracer's order, and the graph itself.

Order: active features (by layer, then position, then feature index), one
error node per (layer, position) (layer-major), one token node per position,
then the logit nodes (most likely first). ``adjacency[target, source]`` is the
direct effect of ``source`` on ``target``; rows of error and token nodes are
zero (nothing is attributed to them).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from mitk.shapes import Float, Int


@dataclass(frozen=True)
class GraphNodes:
    """What each node of a graph is.

    ``features[i] = (layer, pos, feature)`` with activation ``activations[i]``;
    ``logit_tokens`` are the logit nodes' token ids, ``logit_probabilities``
    their probabilities at the last position; ``tokens`` the prompt.
    """

    tokens: Int[Tensor, " pos"]
    n_layers: int
    features: Int[Tensor, "n_features 3"]
    activations: Float[Tensor, " n_features"]
    logit_tokens: Int[Tensor, " n_logits"]
    logit_probabilities: Float[Tensor, " n_logits"]

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def error_start(self) -> int:
        """Index of the first error node (layer 0, position 0)."""
        return self.n_features

    @property
    def token_start(self) -> int:
        """Index of the first token node (position 0)."""
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        """Index of the first (most likely) logit node."""
        return self.token_start + self.n_pos

    def error_index(self, layer: int, pos: int) -> int:
        """The node of layer ``layer``'s error term at ``pos``."""
        return self.error_start + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        """The node of the token embedding at ``pos``."""
        return self.token_start + pos

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        """The node of an active feature; ``KeyError`` when it is not a node."""
        match = (self.features == self.features.new_tensor([layer, pos, feature])).all(-1)
        hits = match.nonzero()
        if hits.numel() == 0:
            raise KeyError(f"feature {feature} at layer {layer}, position {pos} is not a node")
        return int(hits[0, 0])

    def to_frame(self) -> pd.DataFrame:
        """One row per node: ``node, kind, layer, pos, feature, token, value``.

        ``value`` is the activation (features), the probability (logits) or
        empty; ``layer`` is ``n_layers`` for logits, -1 for tokens.
        """
        rows = []
        for i, (layer, pos, feature) in enumerate(self.features.tolist()):
            rows.append(("feature", layer, pos, feature, -1, float(self.activations[i])))
        for layer in range(self.n_layers):
            rows += [("error", layer, pos, -1, -1, float("nan")) for pos in range(self.n_pos)]
        for pos, token in enumerate(self.tokens.tolist()):
            rows.append(("token", -1, pos, -1, token, float("nan")))
        for token, prob in zip(
            self.logit_tokens.tolist(), self.logit_probabilities.tolist(), strict=True
        ):
            rows.append(("logit", self.n_layers, self.n_pos - 1, -1, token, prob))
        frame = pd.DataFrame(rows, columns=["kind", "layer", "pos", "feature", "token", "value"])
        frame.insert(0, "node", range(len(frame)))
        return frame


@dataclass(frozen=True)
class AttributionGraph:
    """Direct effects between the nodes of one prompt's replacement model.

    ``adjacency[target, source]``: for a feature target, the source's
    contribution to the feature's pre-activation; for a logit target, to the
    demeaned logit (the logit less the mean logit over the vocabulary, without
    ``b_U``). ``target_values`` holds those pre-activations and demeaned logits
    (0 for error and token nodes): each is the sum of its row plus terms that
    are no node (biases, positional embeddings, the MLP outputs at positions
    without features).
    """

    nodes: GraphNodes
    adjacency: Float[Tensor, "n_nodes n_nodes"]
    target_values: Float[Tensor, " n_nodes"]

    def to_frame(self, min_abs: float = 0.0) -> pd.DataFrame:
        """One row per edge with ``|weight| > min_abs``: ``target, source, weight`` and, for
        each end, its ``kind``, ``layer``, ``pos`` and ``feature`` (``target_kind``, ...)."""
        weights = self.adjacency
        targets, sources = (weights.abs() > min_abs).nonzero(as_tuple=True)
        edges = pd.DataFrame({
            "target": targets.tolist(),
            "source": sources.tolist(),
            "weight": weights[targets, sources].tolist(),
        })  # fmt: skip
        described = self.nodes.to_frame()[["node", "kind", "layer", "pos", "feature"]]
        for end in ("target", "source"):
            named = described.rename(
                columns=lambda c, end=end: end if c == "node" else f"{end}_{c}"
            )
            edges = edges.merge(named, on=end, how="left")
        return edges
