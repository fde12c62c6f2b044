"""What every discovery method returns: the circuit it chose and a score for every edge."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.discovery.circuit import Circuit
from mitk.analysis.discovery.graph import EdgeGraph
from mitk.shapes import Float


@dataclass(frozen=True)
class DiscoveryResult:
    """A found circuit and the per-edge scores it was chosen from.

    ``scores[s, r]`` belongs to edge ``graph.senders[s] -> graph.receivers[r]``
    (NaN where no edge exists); positional scores ``[pos, sender, receiver]``
    score each edge at each position (``eap_ig(positional=True)``) and their
    circuits are positional. Larger magnitude means more important; what a
    score measures depends on ``method`` (an attribution for ``eap_ig``, the
    metric change on removal for ``acdc``, a mask logit for ``edge_pruning``).
    """

    circuit: Circuit
    scores: Float[Tensor, "*pos sender receiver"]
    method: str

    @property
    def positional(self) -> bool:
        """Whether the scores are per position (``[pos, sender, receiver]``)."""
        return self.scores.dim() == 3

    @property
    def graph(self) -> EdgeGraph:
        """The graph the scores and circuit belong to."""
        return self.circuit.graph

    def top(self, n_edges: int) -> Circuit:
        """The ``n_edges`` edges with the largest absolute scores."""
        return Circuit.top(self.graph, self.scores.nan_to_num(0.0), n_edges)

    def to_frame(self) -> pd.DataFrame:
        """One row per existing edge: sender, receiver, score, in_circuit; largest |score| first.

        Positional scores give one row per edge and position, with a ``pos`` column.
        """
        graph = self.graph
        if self.positional:
            present = graph.present.expand(self.scores.shape[0], *graph.present.shape)
            cells = [tuple(c) for c in present.nonzero().tolist()]
        else:
            cells = [(None, *c) for c in graph.present.nonzero().tolist()]
        rows = []
        for p, s, r in cells:
            edge = (graph.senders[s], graph.receivers[r])
            row = {"sender": edge[0], "receiver": edge[1]}
            if p is not None:
                row["pos"] = p
            index = (s, r) if p is None else (p, s, r)
            row["score"] = float(self.scores[index])
            row["in_circuit"] = (*edge, p) in self.circuit
            rows.append(row)
        frame = pd.DataFrame(rows)
        order = frame["score"].abs().sort_values(ascending=False, kind="stable").index
        return frame.reindex(order).reset_index(drop=True)


def with_nan(graph: EdgeGraph, scores: Tensor) -> Float[Tensor, "*pos sender receiver"]:
    """``scores`` on CPU with NaN where the graph has no edge."""
    return scores.detach().float().cpu().masked_fill(~graph.present, float("nan"))


def as_scores(graph: EdgeGraph, values: Tensor) -> Tensor:
    """Scores without NaNs (absent edges 0), for ranking."""
    return torch.nan_to_num(values.detach().float().cpu(), 0.0) * graph.present
