"""Faithfulness: how much of the model's behaviour a circuit recovers with every other edge ablated.

``recovered = (m_circuit - m_empty) / (m_full - m_empty)`` on prompt means,
where ``m_full`` keeps every edge (the clean run) and ``m_empty`` ablates
them all. A random circuit with as many edges (seeded) runs in the same
forward as the baseline. ``faithfulness_curve`` does the same for the top
edges of a method's scores at several edge fractions and integrates the
Mechanistic Interpretability Benchmark's summaries over them: CPR, the area
under the recovered curve (higher is better), and CMD, the area of
``|1 - recovered|`` (lower is better), both by the trapezoid rule over the
achieved edge fractions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import math
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.discovery.circuit import Circuit
from mitk.analysis.discovery.masked import Ablation, MaskedRun
from mitk.analysis.discovery.result import DiscoveryResult, as_scores
from mitk.shapes import Float

FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Faithfulness:
    """A circuit's metric recovered, beside a random circuit of the same size.

    ``circuit``, ``random``, ``full``, ``empty``: the metric per prompt.
    """

    recovered: float
    random_recovered: float
    circuit: Float[Tensor, " batch"]
    random: Float[Tensor, " batch"]
    full: Float[Tensor, " batch"]
    empty: Float[Tensor, " batch"]
    n_edges: int
    fraction: float
    ablation: str


def normalized(value: Tensor, full: Tensor, empty: Tensor) -> Tensor:
    """``(value - empty) / (full - empty)`` on prompt means (last axis)."""
    return (value.mean(-1) - empty.mean()) / (full.mean() - empty.mean())


def _masks(run: MaskedRun, circuits: Sequence[Circuit]) -> Tensor:
    positional = any(c.positional for c in circuits)
    masks = [c.mask(run.seq if positional else None) for c in circuits]
    if positional:  # non-positional masks keep their edges at every position
        masks = [m if m.dim() == 3 else m.expand(run.seq, *m.shape) for m in masks]
    graph = circuits[0].graph
    return graph.fine_mask(torch.stack(masks)).to(run.tokens.device)


def faithfulness(
    model: Any,
    circuit: Circuit,
    data: Any,
    metric: Any,
    ablation: Ablation = "resample",
    *,
    seed: int = 0,
    memory_budget_gb: float = 2.0,
) -> Faithfulness:
    """Run ``model`` with every edge outside ``circuit`` ablated; the metric it recovers.

    ``data``: ``Prompts``, clean tokens, or ``(clean, corrupted)``; see
    ``Prompts`` for where mean and resample ablations come from; the default,
    resample, is the discovery methods' default too, so a circuit is scored
    under the ablation it was found with. ``metric``:
    a ready-made metric or a callable from logits ``[batch, pos, d_vocab]``
    to ``[batch]``. Circuit and random baseline run in one batched forward.
    """
    run = MaskedRun(model, circuit.graph, data, metric, ablation)
    if circuit.positional:  # as many edge-positions, drawn from every edge at every position
        baseline = Circuit.random(circuit.graph, len(circuit), seed, seq=run.seq)
    else:
        baseline = Circuit.random(circuit.graph, len(circuit), seed)
    values = run.chunked(run.metric, _masks(run, [circuit, baseline]), memory_budget_gb)
    recovered = normalized(values, run.full, run.empty)
    return Faithfulness(
        recovered=float(recovered[0]),
        random_recovered=float(recovered[1]),
        circuit=values[0].cpu(),
        random=values[1].cpu(),
        full=run.full.cpu(),
        empty=run.empty.cpu(),
        n_edges=len(circuit),
        fraction=circuit.fraction(),
        ablation=ablation,
    )


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Metric recovered by the top edges at each edge fraction, with CPR and CMD.

    ``fractions`` are the achieved ones (``n_edges / total``); ``random`` is
    the same curve for random circuits of those sizes (seeded).
    """

    fractions: list[float]
    n_edges: list[int]
    recovered: list[float]
    random: list[float]
    cpr: float
    cmd: float
    random_cpr: float
    ablation: str

    def to_frame(self) -> pd.DataFrame:
        """One row per fraction: fraction, n_edges, recovered, random."""
        return pd.DataFrame(
            {
                "fraction": self.fractions,
                "n_edges": self.n_edges,
                "recovered": self.recovered,
                "random": self.random,
            }
        )


def _area(x: Sequence[float], y: Sequence[float]) -> float:
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def faithfulness_curve(
    model: Any,
    scores: DiscoveryResult,
    data: Any,
    metric: Any,
    fractions: Sequence[float] = FRACTIONS,
    ablation: Ablation = "resample",
    *,
    seed: int = 0,
    memory_budget_gb: float = 2.0,
) -> FaithfulnessCurve:
    """The MIB faithfulness curve of any method's scores: top edges by |score| per fraction.

    Each fraction keeps ``round(fraction * total)`` edges (at least one for a
    positive fraction); for positional scores ``total`` counts every edge at
    every position, and the circuits (random ones too) are positional. Every
    circuit, and a random one per size, runs in as few batched forwards as
    the memory budget allows.
    """
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError("fractions must be a non-empty sequence of values in (0, 1]")
    graph = scores.graph
    seq = scores.scores.shape[0] if scores.positional else None
    total = graph.n_edges * (seq or 1)
    sizes = sorted({max(1, min(total, round(f * total))) for f in fractions})
    ranked = as_scores(graph, scores.scores)
    circuits = [Circuit.top(graph, ranked, n) for n in sizes]
    randoms = [Circuit.random(graph, n, seed + i, seq) for i, n in enumerate(sizes)]
    run = MaskedRun(model, graph, data, metric, ablation)
    values = run.chunked(run.metric, _masks(run, circuits + randoms), memory_budget_gb)
    recovered = normalized(values, run.full, run.empty).tolist()
    x = [n / total for n in sizes]
    ours, rand = recovered[: len(sizes)], recovered[len(sizes) :]
    return FaithfulnessCurve(
        fractions=x,
        n_edges=sizes,
        recovered=ours,
        random=rand,
        cpr=_area(x, ours),
        cmd=_area(x, [abs(1 - v) for v in ours]),
        random_cpr=_area(x, rand),
        ablation=ablation,
    )


def smallest_faithful(curve: FaithfulnessCurve, target: float = 0.9) -> tuple[int, float] | None:
    """``(n_edges, fraction)`` of the smallest point on ``curve`` recovering ``target``, if any."""
    for n, f, r in zip(curve.n_edges, curve.fractions, curve.recovered, strict=True):
        if not math.isnan(r) and r >= target:
            return n, f
    return None
