"""ACDC (Conmy et al. 2023): prune edges one receiver at a time while the behaviour holds.

Receivers are visited from the logits backwards. For each, every edge still
into it is tried: removing it is accepted when the criterion worsens by less
than ``threshold`` against the circuit so far. ``criterion="kl"``: KL
divergence of the circuit's next-token distribution from the full model's
(at the metric's answer positions, else averaged over positions); ``"metric"``:
the drop of the metric. A receiver whose node sends nowhere any more is
dropped with all its inputs (they cannot matter).

Senders are tried latest first, as in ACDC, and the circuit is the one the
one-edge-at-a-time algorithm finds. With ``positional=True`` each edge is
tried at each position. Batched: each forward scores several trials,
speculating that the next decisions go as the last one did
(``_try_receiver``), and starts at the receiver's block from the clean
residual stream, as nothing below it is ablated yet.
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
    positional: bool = False,
    memory_budget_gb: float = 2.0,
) -> DiscoveryResult:
    """Prune the graph by ACDC; the circuit is what survives, scores are the last effects measured.

    An edge's score is how much the criterion worsened when it was last tried
    (removed edges score below ``threshold``; edges of dropped nodes score 0).
    ``positional``: every edge is tried at every position (scores and circuit
    ``[pos, sender, receiver]``; senders latest first, each at its positions last
    first), and a node is dropped at the positions where it sends nowhere.
    """
    if criterion not in ("kl", "metric"):
        raise ValueError(f"criterion must be 'kl' or 'metric', got {criterion!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    graph = EdgeGraph.of(model, granularity)
    run = MaskedRun(model, graph, data, metric, ablation)
    score = _Scorer(run, graph, criterion, memory_budget_gb)
    keep = graph.present.float().to(run.tokens.device)
    if positional:
        keep = keep.expand(run.seq, *keep.shape).clone()
    effects = torch.zeros(keep.shape)
    current = float(score(keep[None])[0])
    owners = _owners(graph)
    for r in reversed(range(len(graph.receivers))):
        if owners[r]:  # where its node sends nowhere, nothing it reads can matter: drop it
            sends = keep[..., owners[r], :].flatten(-2).any(-1)  # [] or [pos]
            keep[..., r] *= sends[..., None]
        # latest sender first, as ACDC; at positions, the last first
        cells = sorted(keep[..., r].nonzero().tolist(), key=lambda c: c[::-1], reverse=True)
        keep, current = _try_receiver(score, keep, current, r, cells, threshold, effects)
    circuit = Circuit.from_mask(graph, keep.cpu() > 0)
    where = ", positional" if positional else ""
    return DiscoveryResult(
        circuit, with_nan(graph, effects), f"acdc[{criterion}, {threshold}{where}]"
    )


def _try_receiver(
    score: _Scorer,
    keep: Tensor,
    current: float,
    r: int,
    cells: list[list[int]],
    threshold: float,
    effects: Tensor,
) -> tuple[Tensor, float]:
    """ACDC's loop over the edges into receiver ``r``, in ``cells``' order, batched.

    A cell is an edge's index in ``keep[..., r]``: ``[sender]``, or ``[pos, sender]``.
    Removing an edge is tried against the circuit as it stands after every earlier
    decision. Each forward speculates that the next few decisions go as the last one
    did and scores those trials at once: after a removal, the prefixes of the next
    removals; after an edge stayed, the next single removals. Trials after the first
    decision that breaks the run assumed otherwise and are thrown away. The batch
    doubles while decisions repeat and starts again at one when they change, so a
    receiver costs little more than one mask per edge however its decisions fall.
    Returns the new mask and its score.
    """
    tried, size, removing = 0, 2, True
    while tried < len(cells):
        batch = [tuple(cell) for cell in cells[tried : tried + size]]
        trials = keep[None].repeat(len(batch), *[1] * keep.dim())
        for k, cell in enumerate(batch):
            trials[(k, *cell, r)] = 0.0  # each trial removes its own edge
            if removing:  # and, speculatively, every later trial removes it too
                later: tuple[slice | int, ...] = (slice(k, None), *cell, r)
                trials[later] = 0.0
        values = score(trials).cpu().tolist()
        size *= 2
        for k, value in enumerate(values):
            effects[(*batch[k], r)] = value - current
            removed = value - current < threshold
            if removed:
                keep, current = trials[k], value
            if removed != removing:  # the later trials assumed the other outcome
                tried, size, removing = tried + k + 1, 1, removed
                break
        else:
            tried += len(batch)
    return keep, current
