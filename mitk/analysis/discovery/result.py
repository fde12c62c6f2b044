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
    (NaN where no edge exists). Larger magnitude means more important; what a
    score measures depends on ``method`` (an attribution for ``eap_ig``, the
    metric change on removal for ``acdc``, a mask logit for ``edge_pruning``).
    """

    circuit: Circuit
    scores: Float[Tensor, "sender receiver"]
    method: str

    @property
    def graph(self) -> EdgeGraph:
        """The graph the scores and circuit belong to."""
        return self.circuit.graph

    def top(self, n_edges: int) -> Circuit:
        """The ``n_edges`` edges with the largest absolute scores."""
        return Circuit.top(self.graph, self.scores.nan_to_num(0.0), n_edges)

    def to_frame(self) -> pd.DataFrame:
        """One row per existing edge: sender, receiver, score, in_circuit; largest |score| first."""
        graph = self.graph
        rows = [
            {
                "sender": graph.senders[s],
                "receiver": graph.receivers[r],
                "score": float(self.scores[s, r]),
                "in_circuit": (graph.senders[s], graph.receivers[r]) in self.circuit,
            }
            for s, r in graph.present.nonzero().tolist()
        ]
        frame = pd.DataFrame(rows)
        order = frame["score"].abs().sort_values(ascending=False, kind="stable").index
        return frame.reindex(order).reset_index(drop=True)


def with_nan(graph: EdgeGraph, scores: Tensor) -> Float[Tensor, "sender receiver"]:
    """``scores`` on CPU with NaN where the graph has no edge."""
    return scores.detach().float().cpu().masked_fill(~graph.present, float("nan"))


def as_scores(graph: EdgeGraph, values: Tensor) -> Tensor:
    """Scores without NaNs (absent edges 0), for ranking."""
    return torch.nan_to_num(values.detach().float().cpu(), 0.0) * graph.present
