"""Interventions in the real model beside the graph's predictions."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from mitk.analysis.graphs import attribution_graph, check_intervention
from mitk.sae.splice import spliced
from tests.unit.graphs.models import model, prompt, transcoders

BUILT = model("llama")
LAYERS = transcoders(BUILT, skip=True)
TOKENS = prompt()
GRAPH = attribution_graph(BUILT, LAYERS, TOKENS)
NODES = GRAPH.nodes


def some_features(layer: int, count: int, pos: int | None = None) -> list[tuple[int, int, int]]:
    at_layer = NODES.features[NODES.features[:, 0] == layer]
    if pos is not None:
        at_layer = at_layer[at_layer[:, 1] == pos]
    return [tuple(f) for f in at_layer[:: max(1, len(at_layer) // count)][:count].tolist()]


def test_the_real_change_is_what_splicing_the_transcoders_with_an_edit_gives():
    """An independent route: ``mitk.sae.spliced`` with kept errors and edited latents."""
    chosen = some_features(0, 2) + some_features(1, 2)
    values = [0.0, 2.0, 0.5, 0.0]
    check = check_intervention(BUILT, LAYERS, TOKENS, GRAPH, chosen, values)

    def clamp(layer: int):
        def edit(latents: torch.Tensor) -> torch.Tensor:
            for (at, pos, feature), value in zip(chosen, values, strict=True):
                if at == layer:
                    latents[0, pos, feature] = value
            return latents

        return edit

    unembed = BUILT.unembed.W_U
    directions = unembed[:, NODES.logit_tokens] - unembed.mean(-1, keepdim=True)
    with torch.no_grad():
        clean = BUILT(TOKENS[None], return_type="hidden")[0, -1] @ directions
        with ExitStack() as stack:
            for layer in (0, 1):
                stack.enter_context(
                    spliced(LAYERS[layer], BUILT, keep_error=True, edit_latents=clamp(layer))
                )
            edited = BUILT(TOKENS[None], return_type="hidden")[0, -1] @ directions
    torch.testing.assert_close(check.observed, edited - clean, atol=1e-5, rtol=0)
    assert check.observed.abs().max() > 1e-3


@pytest.mark.parametrize("value", [0.0, 3.0])
def test_frozen_and_in_the_last_layer_the_graph_is_exact(value: float):
    """Nothing downstream of a last-layer feature responds once attention and norms are held."""
    chosen = some_features(BUILT.cfg.n_layers - 1, 3, pos=len(TOKENS) - 1)  # the logits' position
    check = check_intervention(BUILT, LAYERS, TOKENS, GRAPH, chosen, value, frozen=True)
    torch.testing.assert_close(check.observed, check.predicted, atol=1e-5, rtol=0)
    assert check.predicted.abs().max() > 1e-4
    # unfrozen, the final norm's scale moves: the graph is only approximately right
    free = check_intervention(BUILT, LAYERS, TOKENS, GRAPH, chosen, value)
    assert not torch.allclose(free.observed, free.predicted, atol=1e-5, rtol=0)
    assert list(free.to_frame().columns) == ["token", "predicted", "observed", "gap"]


def test_clamping_to_the_activation_changes_nothing_and_non_nodes_are_refused():
    chosen = some_features(1, 3)
    index = [NODES.feature_index(*f) for f in chosen]
    check = check_intervention(BUILT, LAYERS, TOKENS, GRAPH, chosen, NODES.activations[index])
    assert check.predicted.abs().max() < 1e-6 and check.observed.abs().max() < 1e-5
    inactive = next(
        (0, 3, f)
        for f in range(48)
        if not ((NODES.features == torch.tensor([0, 3, f])).all(1)).any()
    )
    with pytest.raises(KeyError, match="not a node"):
        check_intervention(BUILT, LAYERS, TOKENS, GRAPH, [inactive])
