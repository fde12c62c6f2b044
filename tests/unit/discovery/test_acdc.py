"""ACDC's batched speculation finds exactly what the one-edge-at-a-time algorithm finds."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mitk.analysis.discovery import EdgeGraph, acdc
from mitk.analysis.discovery.acdc import _owners
from mitk.analysis.discovery.masked import MaskedRun
from tests.unit.discovery.models import LastLogit, random_pair, tiny


def _one_edge_at_a_time(
    run: MaskedRun, graph: EdgeGraph, threshold: float, criterion: str
) -> tuple[Tensor, Tensor]:
    """The published loop: receivers from the logits back, senders latest first, one forward
    per edge, accepted when the criterion worsens by less than ``threshold``."""

    def score(mask: Tensor) -> float:
        with torch.no_grad():
            fine = graph.fine_mask(mask[None])
            if criterion == "kl":
                return float(run.kl(fine).mean())
            return -float(run.metric(fine).mean())

    keep, effects = graph.present.double(), torch.zeros(graph.present.shape, dtype=torch.float64)
    current, owners = score(keep), _owners(graph)
    for r in reversed(range(len(graph.receivers))):
        if owners[r] and not bool(keep[owners[r]].any()):
            keep[:, r] = 0.0
            continue
        for s in reversed(keep[:, r].nonzero().flatten().tolist()):
            trial = keep.clone()
            trial[s, r] = 0.0
            value = score(trial)
            effects[s, r] = value - current
            if value - current < threshold:
                keep, current = trial, value
    return keep > 0, effects


@pytest.mark.parametrize(
    ("kind", "granularity", "criterion", "share"),
    [
        ("mha", "heads", "kl", 0.02),
        ("mha", "layers", "kl", 0.05),
        ("gqa", "heads", "metric", 0.003),
        ("parallel", "layers", "metric", 0.01),
    ],
)
def test_acdc_finds_what_one_edge_at_a_time_finds(
    kind: str, granularity: str, criterion: str, share: float
) -> None:
    model = tiny(kind).double()
    prompts, metric = random_pair(), LastLogit(3)
    graph = EdgeGraph.of(model, granularity)  # type: ignore[arg-type]
    run = MaskedRun(model, graph, prompts, metric, "resample")
    with torch.no_grad():  # a threshold that keeps some edges and drops others
        if criterion == "kl":
            scale = float(run.kl(run.keep_all(0.0)).mean())
        else:
            scale = float((run.full - run.empty).abs().mean())
    threshold = share * scale
    expected, effects = _one_edge_at_a_time(run, graph, threshold, criterion)
    assert 0 < int(expected.sum()) < graph.n_edges // 2, "the case should decide both ways"
    found = acdc(
        model,
        prompts,
        metric,
        threshold,
        criterion=criterion,
        granularity=granularity,  # type: ignore[arg-type]
    )
    assert torch.equal(found.circuit.mask(), expected)
    tried = effects != 0
    torch.testing.assert_close(found.scores[tried].double(), effects[tried], atol=1e-9, rtol=1e-6)
