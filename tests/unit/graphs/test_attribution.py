"""The attribution graph's identities: rows sum to their targets, ablations move them by an edge."""

from __future__ import annotations

import pytest
import torch

from mitk.analysis.graphs import (
    GraphNodes,
    active_features,
    attribution_graph,
    prompt_state,
    replacement_logits,
)
from mitk.analysis.graphs.direct_effects import DirectEffects
from mitk.analysis.graphs.transpose import covers
from tests.unit.graphs import frozen
from tests.unit.graphs.models import model, prompt, transcoders

VARIANTS = [  # (model kind, what the transcoders read, skip-transcoders, features at position 0)
    ("gpt2", "ln2.hook_normalized", False, False),
    ("gpt2", "hook_resid_mid", True, True),
    ("llama", "ln2.hook_normalized", True, False),
    ("llama", "hook_resid_mid", False, True),
]


def target_rows(nodes: GraphNodes) -> torch.Tensor:
    """The nodes that have incoming edges: features and logits."""
    features = torch.arange(nodes.n_features)
    return torch.cat([features, torch.arange(nodes.logit_start, nodes.n_nodes)])


@pytest.mark.parametrize(("kind", "reads", "skip", "first"), VARIANTS)
def test_replacement_model_logits_equal_the_models(kind: str, reads: str, skip: bool, first: bool):
    built = model(kind)
    layers = transcoders(built, reads=reads, skip=skip)
    tokens = prompt()
    with torch.no_grad():
        expected = built(tokens[None])[0]
    got = replacement_logits(built, layers, tokens, first_position_features=first)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the error terms carry what the transcoders miss: without them the logits move
    state = prompt_state(built, layers, tokens, first_position_features=first)
    assert state.errors.abs().max() > 1e-2


@pytest.mark.parametrize(
    ("kind", "reads", "skip", "first"),
    [
        *VARIANTS,
        ("gqa", "ln2.hook_normalized", True, False),
        ("parallel", "ln2.hook_normalized", False, False),
        ("sandwich", "hook_resid_mid", True, False),
    ],
)
def test_each_target_is_its_incoming_edges_plus_the_terms_that_are_no_nodes(
    kind: str, reads: str, skip: bool, first: bool
):
    built = model(kind)
    layers = transcoders(built, reads=reads, skip=skip)
    tokens = prompt()
    graph = attribution_graph(built, layers, tokens, batch_size=64, first_position_features=first)
    state = prompt_state(built, layers, tokens, first_position_features=first)
    nodes = graph.nodes
    assert nodes.n_features > 50 and nodes.n_logits >= 2
    # the targets, recomputed forward: at the prompt's values, and with every node switched off
    full = frozen.targets(built, layers, state, graph)
    zeros = [torch.zeros_like(a) for a in state.activations]
    constant = frozen.targets(built, layers, state, graph, activations=zeros, error_scale=0.0,
                              embed_scale=0.0)  # fmt: skip
    rows = target_rows(nodes)
    torch.testing.assert_close(graph.target_values[rows], full[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        graph.adjacency.sum(1)[rows] + constant[rows], full[rows], atol=1e-5, rtol=0
    )
    # edges only run forward: from earlier layers, never into errors or tokens
    assert not graph.adjacency[nodes.error_start : nodes.logit_start].any()
    layer_of = nodes.features[:, 0]
    same_or_later = layer_of[:, None] <= layer_of[None, :]
    assert not graph.adjacency[: nodes.n_features, : nodes.n_features][same_or_later].any()


@pytest.mark.parametrize(("kind", "reads", "skip", "first"), [VARIANTS[0], VARIANTS[2]])
def test_zeroing_a_source_moves_each_target_by_minus_its_edge(
    kind: str, reads: str, skip: bool, first: bool
):
    built = model(kind)
    layers = transcoders(built, reads=reads, skip=skip)
    tokens = prompt()
    graph = attribution_graph(built, layers, tokens, first_position_features=first)
    state = prompt_state(built, layers, tokens, first_position_features=first)
    nodes = graph.nodes
    full = frozen.targets(built, layers, state, graph)
    gen = torch.Generator().manual_seed(0)
    in_early_layers = (nodes.features[:, 0] < built.cfg.n_layers - 1).nonzero()[:, 0]
    picks = in_early_layers[torch.randperm(len(in_early_layers), generator=gen)[:3]]
    for source in picks.tolist():
        layer, pos, feature = nodes.features[source].tolist()
        acts = [a.clone() for a in state.activations]
        acts[layer][pos, feature] = 0
        moved = frozen.targets(built, layers, state, graph, activations=acts) - full
        rows = target_rows(nodes)
        torch.testing.assert_close(moved[rows], -graph.adjacency[rows, source], atol=1e-5, rtol=0)
        assert graph.adjacency[rows, source].abs().max() > 1e-4  # the source reaches something
    # the error nodes and token nodes: switching all of them off moves targets by their edges' sum
    moved = frozen.targets(built, layers, state, graph, error_scale=0.0) - full
    errors = graph.adjacency[:, nodes.error_start : nodes.token_start].sum(1)
    torch.testing.assert_close(moved, -errors, atol=1e-5, rtol=0)
    moved = frozen.targets(built, layers, state, graph, embed_scale=0.0) - full
    tokens_sum = graph.adjacency[:, nodes.token_start : nodes.logit_start].sum(1)
    torch.testing.assert_close(moved, -tokens_sum, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kind", "reads", "skip"),
    [("gpt2", "ln2.hook_normalized", True), ("gqa", "hook_resid_mid", True),
     ("parallel", "ln2.hook_normalized", False)],
)  # fmt: skip
def test_the_written_out_transpose_agrees_with_autograd(kind: str, reads: str, skip: bool):
    built = model(kind)
    assert covers(built) and not covers(model("sandwich"))
    layers = transcoders(built, reads=reads, skip=skip)
    state = prompt_state(built, layers, prompt())
    features, activations = active_features(state)
    # every feature as a target, and two logit-like targets at the final norm's output
    n_layers, n_pos = built.cfg.n_layers, state.tokens.shape[0]
    at_layer = torch.cat([features[:, 0], torch.tensor([n_layers, n_layers])])
    at_pos = torch.cat([features[:, 1], torch.tensor([n_pos - 1, n_pos - 2])])
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(len(at_layer), built.cfg.d_model, generator=gen)
    rows = {
        backward: DirectEffects(built, layers, state, features, activations, backward).rows(
            at_layer, at_pos, directions
        )
        for backward in ("autograd", "transpose")
    }
    scale = rows["autograd"].abs().max()
    torch.testing.assert_close(
        rows["transpose"] / scale, rows["autograd"] / scale, atol=1e-6, rtol=0
    )


def test_targets_in_any_order_give_the_same_rows():
    """The transpose skips targets below a layer when the batch is in layer order; shuffled,
    it runs every target through every layer, and the rows must not change."""
    built = model("gpt2")
    layers = transcoders(built, skip=False)
    state = prompt_state(built, layers, prompt())
    features, activations = active_features(state)
    effects = DirectEffects(built, layers, state, features, activations, "transpose")
    gen = torch.Generator().manual_seed(2)
    directions = torch.randn(len(features), built.cfg.d_model, generator=gen)
    in_order = effects.rows(features[:, 0], features[:, 1], directions)
    shuffle = torch.randperm(len(features), generator=gen)
    shuffled = effects.rows(features[shuffle, 0], features[shuffle, 1], directions[shuffle])
    torch.testing.assert_close(shuffled, in_order[shuffle], atol=1e-6, rtol=0)
    assert in_order.abs().max() > 1e-2
