"""Edge pruning (Bhaskar et al. 2024): learn a continuous mask over edges with a sparsity penalty.

Each edge has a log-odds ``log_alpha``; a step samples a hard-concrete gate
per edge (Louizos et al. 2018: a stretched, clipped binary concrete, so gates
are exactly 0 or 1 with positive probability), runs the masked model with it
and minimises ``objective + sparsity * expected share of gates open`` (the
L0 penalty in closed form) with Adam. ``objective="kl"``: KL divergence from
the full model's next-token distribution; ``"metric"``: the metric's drop
from the full model, ``mean(m_full - m_masked)``. The model's weights never
change. The circuit is the edges whose deterministic gate is above 0.5;
scores are the learned ``log_alpha``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from mitk.analysis.discovery.circuit import Circuit
from mitk.analysis.discovery.graph import EdgeGraph, Granularity
from mitk.analysis.discovery.masked import Ablation, MaskedRun
from mitk.analysis.discovery.result import DiscoveryResult, with_nan

Objective = Literal["kl", "metric"]
# the hard-concrete stretch interval and temperature of Louizos et al.
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0


def _gates(log_alpha: Tensor, generator: torch.Generator | None) -> Tensor:
    """A hard-concrete sample per edge (deterministic when ``generator`` is None)."""
    if generator is None:
        s = torch.sigmoid(log_alpha)
    else:
        u = torch.rand(log_alpha.shape, generator=generator).to(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _open_share(log_alpha: Tensor, present: Tensor) -> Tensor:
    """Expected share of existing edges whose gate is non-zero (the L0 penalty)."""
    p_open = torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))
    return (p_open * present).sum() / present.sum()


def edge_pruning(
    model: Any,
    data: Any,
    metric: Any,
    *,
    sparsity: float = 1.0,
    steps: int = 300,
    lr: float = 0.1,
    objective: Objective = "kl",
    ablation: Ablation = "resample",
    granularity: Granularity = "heads",
    init: float = 3.0,
    seed: int = 0,
    positional: bool = False,
) -> DiscoveryResult:
    """Learn which edges to keep; returns the circuit and each edge's learned log-odds.

    ``sparsity`` weighs the L0 penalty against the objective: larger gives
    smaller circuits. ``init`` is the starting log-odds (3: nearly every gate
    open, so training starts from the full model). ``positional``: a gate per
    edge and position (scores and circuit ``[pos, sender, receiver]``; the
    penalty is the share of all of them open).
    """
    if objective not in ("kl", "metric"):
        raise ValueError(f"objective must be 'kl' or 'metric', got {objective!r}")
    if steps < 1 or sparsity < 0:
        raise ValueError("steps must be >= 1 and sparsity >= 0")
    graph = EdgeGraph.of(model, granularity)
    run = MaskedRun(model, graph, data, metric, ablation)
    device = run.tokens.device
    present = graph.present.float().to(device)
    if positional:
        present = present.expand(run.seq, *present.shape)
    log_alpha = torch.full(present.shape, float(init), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([log_alpha], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    params = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)
        for _ in range(steps):
            with torch.enable_grad():
                keep = graph.fine_mask((_gates(log_alpha, generator) * present)[None])
                if objective == "kl":
                    loss = run.kl(keep).mean()
                else:
                    loss = (run.full - run.metric(keep)[0]).mean()
                loss = loss + sparsity * _open_share(log_alpha, present)
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
    finally:
        for p, flag in zip(model.parameters(), params, strict=True):
            p.requires_grad_(flag)
    final = _gates(log_alpha.detach(), None)
    circuit = Circuit.from_mask(graph, (final > 0.5).cpu())
    scores = with_nan(graph, log_alpha.detach())
    where = ", positional" if positional else ""
    return DiscoveryResult(
        circuit, scores, f"edge_pruning[{objective}, sparsity={sparsity}{where}]"
    )
