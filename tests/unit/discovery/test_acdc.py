"""ACDC's batched speculation finds exactly what the one-edge-at-a-time algorithm finds."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mitk.analysis.discovery import EdgeGraph, acdc, edge_pruning
from mitk.analysis.discovery.acdc import _owners
from mitk.analysis.discovery.masked import MaskedRun
from tests.unit.discovery.models import LastLogit, random_pair, tiny


def _one_edge_at_a_time(
    run: MaskedRun, graph: EdgeGraph, threshold: float, criterion: str, positional: bool = False
) -> tuple[Tensor, Tensor]:
    """The published loop: receivers from the logits back, senders latest first, one forward
    per edge, accepted when the criterion worsens by less than ``threshold``. Positional:
    each sender at each position, the last position first."""

    def score(mask: Tensor) -> float:
        with torch.no_grad():
            fine = graph.fine_mask(mask[None])
            if criterion == "kl":
                return float(run.kl(fine).mean())
            return -float(run.metric(fine).mean())

    keep = graph.present.double()
    if positional:
        keep = keep.expand(run.seq, *keep.shape).clone()
    effects = torch.zeros(keep.shape, dtype=torch.float64)
    current, owners = score(keep), _owners(graph)
    positions = list(range(run.seq)) if positional else [None]
    for r in reversed(range(len(graph.receivers))):
        for p in positions:
            at = keep if p is None else keep[p]
            if owners[r] and not bool(at[owners[r]].any()):  # sends nowhere (here): drop it
                at[:, r] = 0.0
        for s in reversed(range(len(graph.senders))):
            for p in reversed(positions):
                cell = (s, r) if p is None else (p, s, r)
                if not keep[cell]:
                    continue
                trial = keep.clone()
                trial[cell] = 0.0
                value = score(trial)
                effects[cell] = value - current
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


@pytest.mark.parametrize(("kind", "criterion"), [("mha", "kl"), ("gqa", "metric")])
def test_positional_acdc_finds_what_one_edge_and_position_at_a_time_finds(
    kind: str, criterion: str
) -> None:
    model = tiny(kind).double()
    prompts, metric = random_pair(seq=5), LastLogit(3)
    graph = EdgeGraph.of(model, "layers")
    run = MaskedRun(model, graph, prompts, metric, "resample")
    with torch.no_grad():
        if criterion == "kl":
            scale = float(run.kl(run.keep_all(0.0)).mean())
        else:
            scale = float((run.full - run.empty).abs().mean())
    threshold = 0.01 * scale
    expected, effects = _one_edge_at_a_time(run, graph, threshold, criterion, positional=True)
    n_cells = run.seq * graph.n_edges
    assert 0 < int(expected.sum()) < n_cells // 2, "the case should decide both ways"
    found = acdc(
        model, prompts, metric, threshold, criterion=criterion, granularity="layers",  # type: ignore[arg-type]
        positional=True,
    )  # fmt: skip
    assert found.positional and found.scores.shape == (run.seq, *graph.present.shape)
    assert torch.equal(found.circuit.mask(seq=run.seq) > 0, expected)
    tried = effects != 0
    torch.testing.assert_close(found.scores[tried].double(), effects[tried], atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("method", ["acdc", "edge_pruning"])
def test_positional_methods_drop_logit_edges_where_the_metric_does_not_read(method: str) -> None:
    # the metric reads the last position only: an edge into the logits elsewhere cannot matter
    model, prompts, metric = tiny("mha"), random_pair(seq=5), LastLogit(3)
    if method == "acdc":
        found = acdc(model, prompts, metric, 1e-6, criterion="metric", positional=True)
    else:
        found = edge_pruning(
            model, prompts, metric, sparsity=0.5, steps=60, objective="metric", positional=True
        )
    edges = found.circuit.edges
    assert found.circuit.positional and edges
    into_logits = {e.pos for e in edges if e.receiver == "logits"}
    assert into_logits == {4}, sorted(into_logits)
