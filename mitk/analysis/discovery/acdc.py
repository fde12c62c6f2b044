"""ACDC (Conmy et al. 2023): prune edges one receiver at a time while the behaviour holds.

Receivers are visited from the logits backwards. For each, every edge still
into it is tried: removing it is accepted when the criterion worsens by less
than ``threshold`` against the circuit so far. ``criterion="kl"``: KL
divergence of the circuit's next-token distribution from the full model's
(at the metric's answer positions, else averaged over positions); ``"metric"``:
the drop of the metric. A receiver whose node sends nowhere any more is
dropped with all its inputs (they cannot matter).

Batched: the single-edge removals into one receiver run as one forward;
candidates below the threshold are then accepted greedily, smallest effect
first, by evaluating all their prefixes in one more forward and keeping the
longest prefix whose every step stays under the threshold; the first edge
that fails is kept and the rest are tried again. The result matches ACDC's
one-edge-at-a-time rule in what is accepted, with the order within a
receiver by effect rather than by sender.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mitk.analysis.discovery.circuit import Circuit
from mitk.analysis.discovery.graph import EdgeGraph, Granularity
from mitk.analysis.discovery.masked import Ablation, MaskedRun
from mitk.analysis.discovery.result import DiscoveryResult, with_nan

Criterion = Literal["kl", "metric"]


def _owners(graph: EdgeGraph) -> list[list[int]]:
    """Per receiver, the sender indices of the node that reads it (empty for the logits)."""
    owners: list[list[int]] = []
    for receiver in graph.receivers:
        node = receiver.split(".")[0]
        if receiver == "logits":
            owners.append([])
        elif "KV" in node:  # a key-value head: every query head of its group
            layer, g = node[1:].split("KV")
            group = graph.shape.group
            heads = [f"L{layer}H{h}" for h in range(int(g) * group, (int(g) + 1) * group)]
            owners.append([graph.senders.index(h) for h in heads])
        else:
            owners.append([graph.senders.index(node)])
    return owners


class _Scorer:
    """The criterion of many circuits at once (lower is better), means over prompts."""

    def __init__(self, run: MaskedRun, graph: EdgeGraph, criterion: Criterion, budget: float):
        self.run, self.graph, self.criterion, self.budget = run, graph, criterion, budget

    def __call__(self, keeps: Tensor) -> Tensor:
        fine = self.graph.fine_mask(keeps)
        if self.criterion == "kl":
            return self.run.chunked(self.run.kl, fine, self.budget).mean(-1)
        return -self.run.chunked(self.run.metric, fine, self.budget).mean(-1)


def acdc(
    model: Any,
    data: Any,
    metric: Any,
    threshold: float,
    *,
    criterion: Criterion = "kl",
    ablation: Ablation = "resample",
    granularity: Granularity = "heads",
    memory_budget_gb: float = 2.0,
) -> DiscoveryResult:
    """Prune the graph by ACDC; the circuit is what survives, scores are the last effects measured.

    An edge's score is how much the criterion worsened when it was last tried
    (removed edges score below ``threshold``; edges of dropped nodes score 0).
    """
    if criterion not in ("kl", "metric"):
        raise ValueError(f"criterion must be 'kl' or 'metric', got {criterion!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    graph = EdgeGraph.of(model, granularity)
    run = MaskedRun(model, graph, data, metric, ablation)
    score = _Scorer(run, graph, criterion, memory_budget_gb)
    device = run.tokens.device
    keep = graph.present.float().to(device)
    effects = torch.zeros(graph.present.shape)
    current = float(score(keep[None])[0])
    owners = _owners(graph)
    for r in reversed(range(len(graph.receivers))):
        if owners[r] and not bool(keep[owners[r]].any()):  # its node sends nowhere: drop it
            keep[:, r] = 0.0
            continue
        candidates = keep[:, r].nonzero().flatten().tolist()
        while candidates:
            keep, current, candidates = _try_receiver(
                score, keep, current, r, candidates, threshold, effects
            )
    circuit = Circuit.from_mask(graph, keep.cpu() > 0)
    return DiscoveryResult(circuit, with_nan(graph, effects), f"acdc[{criterion}, {threshold}]")


def _try_receiver(
    score: _Scorer,
    keep: Tensor,
    current: float,
    r: int,
    candidates: list[int],
    threshold: float,
    effects: Tensor,
) -> tuple[Tensor, float, list[int]]:
    """One round for receiver ``r``: returns the new mask, its score and the senders left to try."""
    singles = keep[None].repeat(len(candidates), 1, 1)
    singles[torch.arange(len(candidates)), candidates, r] = 0.0
    single_scores = score(singles).cpu()
    increase = single_scores - current
    effects[candidates, r] = increase
    order = increase.argsort().tolist()
    removable = [candidates[i] for i in order if increase[i] < threshold]
    if not removable:
        return keep, current, []
    prefixes = keep[None].repeat(len(removable), 1, 1)
    for k in range(len(removable)):
        prefixes[k:, removable[k], r] = 0.0
    # the first prefix is the best single removal, already scored
    values = [float(single_scores[order[0]])]
    if len(removable) > 1:
        values += score(prefixes[1:]).cpu().tolist()
    accepted, previous = 0, current
    for value in values:
        if value - previous >= threshold:
            break
        accepted, previous = accepted + 1, value
    if accepted:
        keep = prefixes[accepted - 1].clone()
        current = values[accepted - 1]
    tried = set(removable[: accepted + 1])  # the first failing edge stays, tested against this
    rest = [s for s in candidates if s not in tried and s in removable]
    return keep, current, rest
