"""Every discovery method on known answers: the toy's induction circuit and a planted circuit.

The toy's heads are found by ``mitk.analysis.detectors`` here, not written in:
the previous-token head of layer 0 must K-compose into every induction head
of layer 1, every induction head must reach the logits, and the circuit must
recover at least 90% of the metric while a random circuit of its size stays
near 0. The edge fraction each method needed is printed (``pytest -s``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import pytest

from mitk.analysis.discovery import (
    DiscoveryResult,
    acdc,
    eap_ig,
    edge_pruning,
    faithfulness,
    faithfulness_curve,
)
from mitk.analysis.discovery.faithfulness import smallest_faithful
from tests.unit.discovery.models import Induction, planted, toy_induction


@cache
def _toy() -> Induction:
    return toy_induction()


def _eap(on: str) -> Callable[[Any, Any, Any], DiscoveryResult]:
    def run(model: Any, data: Any, metric: Any) -> DiscoveryResult:
        return eap_ig(model, data, metric, ig_steps=5, on=on)  # type: ignore[arg-type]

    return run


METHODS: dict[str, Callable[[Any, Any, Any], DiscoveryResult]] = {
    "eap_ig_inputs": _eap("inputs"),
    "eap_ig_activations": _eap("activations"),
    # ACDC's own order (latest sender first): 0.05 keeps 20 edges recovering 0.88; 0.04 keeps
    # 22 recovering 0.93
    "acdc": lambda model, data, metric: acdc(model, data, metric, threshold=0.04),
    "edge_pruning": lambda model, data, metric: edge_pruning(
        model, data, metric, sparsity=5.0, steps=150
    ),
}


def _circuit_of(name: str, result: DiscoveryResult, toy: Induction) -> Any:
    """ACDC and edge pruning choose their circuit; EAP's is the smallest faithful top-k."""
    if not name.startswith("eap"):
        return result.circuit
    fractions = [n / result.graph.n_edges for n in range(8, 41, 2)]
    curve = faithfulness_curve(toy.model, result, toy.prompts, toy.metric, fractions, "resample")
    assert curve.cpr > curve.random_cpr
    found = smallest_faithful(curve, 0.9)
    assert found is not None, curve.to_frame()
    return result.top(found[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_finds_the_toy_induction_circuit(name: str) -> None:
    toy = _toy()
    result = METHODS[name](toy.model, toy.prompts, toy.metric)
    circuit = _circuit_of(name, result, toy)
    for head in toy.induction:
        assert (toy.previous, f"{head}.k") in circuit, f"{toy.previous} -> {head}.k missing"
        assert (head, "logits") in circuit, f"{head} -> logits missing"
    score = faithfulness(toy.model, circuit, toy.prompts, toy.metric, "resample", seed=1)
    print(
        f"\n{name}: {len(circuit)} of {circuit.graph.n_edges} edges "
        f"(fraction {circuit.fraction():.3f}), recovered {score.recovered:.3f}, "
        f"random circuit of that size {score.random_recovered:.3f}"
    )
    assert score.recovered >= 0.9
    assert abs(score.random_recovered) < 0.1


PLANTED: dict[str, Callable[[Any, Any, Any], DiscoveryResult]] = {
    "eap_ig_inputs": lambda m, d, f: eap_ig(m, d, f, ig_steps=3, n_edges=3),
    "eap_ig_activations": lambda m, d, f: eap_ig(m, d, f, ig_steps=3, on="activations", n_edges=3),
    "eap_plain": lambda m, d, f: eap_ig(m, d, f, ig_steps=1, n_edges=3),
    "acdc_kl": lambda m, d, f: acdc(m, d, f, threshold=0.01),
    "acdc_metric": lambda m, d, f: acdc(m, d, f, threshold=0.1, criterion="metric"),
    "edge_pruning": lambda m, d, f: edge_pruning(m, d, f, sparsity=0.5, steps=150),
    "edge_pruning_metric": lambda m, d, f: edge_pruning(
        m, d, f, sparsity=0.5, steps=150, objective="metric"
    ),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_each_method_recovers_the_planted_circuit(name: str) -> None:
    model, prompts, metric, plant = planted()
    result = PLANTED[name](model, prompts, metric)
    precision, recall = result.circuit.precision_recall(plant)
    print(f"\n{name}: precision {precision:.2f}, recall {recall:.2f} against the plant")
    assert (precision, recall) == (1.0, 1.0), sorted(result.circuit.edges)
    assert faithfulness(model, plant, prompts, metric, "resample").recovered == pytest.approx(
        1.0, abs=1e-3
    )
