"""Graphs through a cross-layer transcoder: the same identities, and per-layer as a special case."""

from __future__ import annotations

import pytest
import torch

from mitk.analysis.graphs import (
    active_features,
    attribution_graph,
    check_intervention,
    prompt_state,
    replacement_logits,
)
from mitk.analysis.graphs.direct_effects import DirectEffects
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae import CLTConfig, CrossLayerTranscoder, SparseAutoencoder
from mitk.sae.crosslayer_view import layer_transcoder
from tests.unit.graphs import frozen
from tests.unit.graphs.models import cross_layer, model, prompt
from tests.unit.graphs.test_attribution import target_rows

VARIANTS = [  # (model kind, what the CLT reads, activation, features at position 0)
    ("gpt2", "ln2.hook_normalized", "relu", False),
    ("llama", "hook_resid_mid", "jumprelu", True),
    ("gqa", "ln2.hook_normalized", "relu", False),
    ("sandwich", "hook_resid_mid", "relu", False),  # the autograd backward
]


def as_per_layer(clt: CrossLayerTranscoder) -> list[SparseAutoencoder]:
    """Per-layer transcoders with a CLT's encoders and its own-layer decoder slots."""
    return [layer_transcoder(clt, layer) for layer in range(clt.cfg.n_layers)]


@pytest.mark.parametrize(("kind", "reads", "activation", "first"), VARIANTS)
def test_replacement_logits_equal_the_models(kind: str, reads: str, activation: str, first: bool):
    built = model(kind)
    clt = cross_layer(built, reads=reads, activation=activation)
    tokens = prompt()
    with torch.no_grad():
        expected = built(tokens[None])[0]
    got = replacement_logits(built, clt, tokens, first_position_features=first)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "reads", "activation", "first"), VARIANTS)
def test_each_target_is_its_incoming_edges_and_zeroing_a_source_moves_it_by_minus_the_edge(
    kind: str, reads: str, activation: str, first: bool
):
    built = model(kind)
    clt = cross_layer(built, reads=reads, activation=activation)
    tokens = prompt()
    graph = attribution_graph(built, clt, tokens, batch_size=64, first_position_features=first)
    state = prompt_state(built, clt, tokens, first_position_features=first)
    nodes = graph.nodes
    assert nodes.n_features > 50
    full = frozen.targets(built, clt, state, graph)
    zeros = [torch.zeros_like(a) for a in state.activations]
    constant = frozen.targets(built, clt, state, graph, activations=zeros, error_scale=0.0,
                              embed_scale=0.0)  # fmt: skip
    rows = target_rows(nodes)
    torch.testing.assert_close(graph.target_values[rows], full[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        graph.adjacency.sum(1)[rows] + constant[rows], full[rows], atol=1e-5, rtol=0
    )
    # layer-0 features write every layer: zeroing one moves each target by minus its edge
    first_layer = (nodes.features[:, 0] == 0).nonzero()[:, 0]
    for source in first_layer[:: max(1, len(first_layer) // 3)][:3].tolist():
        layer, pos, feature = nodes.features[source].tolist()
        acts = [a.clone() for a in state.activations]
        acts[layer][pos, feature] = 0
        moved = frozen.targets(built, clt, state, graph, activations=acts) - full
        torch.testing.assert_close(moved[rows], -graph.adjacency[rows, source], atol=1e-5, rtol=0)


def test_the_cross_layer_slots_carry_edges_that_per_layer_transcoders_lack():
    """With its later-layer slots zeroed a CLT is per-layer transcoders: the same graph exactly;
    with them, a layer-0 feature's edges into layer 2 change."""
    built = model("gpt2")
    tokens = prompt()
    clt = cross_layer(built, cross=False)
    per_layer = attribution_graph(built, as_per_layer(clt), tokens)
    same = attribution_graph(built, clt, tokens)
    assert torch.equal(same.nodes.features, per_layer.nodes.features)
    torch.testing.assert_close(same.adjacency, per_layer.adjacency, atol=1e-6, rtol=0)
    torch.testing.assert_close(same.target_values, per_layer.target_values, atol=1e-6, rtol=0)

    crossing = attribution_graph(built, cross_layer(built, cross=True), tokens)
    # the prompt's features are the encoders' on the real run: the same nodes
    assert torch.equal(crossing.nodes.features, per_layer.nodes.features)
    layer_of = per_layer.nodes.features[:, 0]
    into_last, from_first = (layer_of == 2).nonzero()[:, 0], (layer_of == 0).nonzero()[:, 0]
    edges = [g.adjacency[into_last][:, from_first] for g in (crossing, per_layer)]
    assert (edges[0] - edges[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kind", "reads"), [("gpt2", "hook_resid_mid"), ("parallel", "ln2.hook_normalized")]
)
def test_the_written_out_transpose_agrees_with_autograd(kind: str, reads: str):
    built = model(kind)
    clt = cross_layer(built, reads=reads)
    state = prompt_state(built, clt, prompt())
    features, activations = active_features(state)
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(len(features), built.cfg.d_model, generator=gen)
    rows = {
        backward: DirectEffects(built, clt, state, features, activations, backward).rows(
            features[:, 0], features[:, 1], directions
        )
        for backward in ("autograd", "transpose")
    }
    scale = rows["autograd"].abs().max()
    torch.testing.assert_close(
        rows["transpose"] / scale, rows["autograd"] / scale, atol=1e-6, rtol=0
    )


def test_interventions_on_a_clt_without_cross_slots_match_per_layer_transcoders():
    built = model("llama")
    tokens = prompt()
    clt = cross_layer(built, cross=False)
    layers = as_per_layer(clt)
    graph = attribution_graph(built, clt, tokens)
    chosen = [tuple(f) for f in graph.nodes.features[::40][:4].tolist()]
    values = [0.0, 2.0, 0.5, 0.0][: len(chosen)]
    for frozen_model in (False, True):
        got = check_intervention(built, clt, tokens, graph, chosen, values, frozen=frozen_model)
        want = check_intervention(built, layers, tokens, graph, chosen, values, frozen=frozen_model)
        torch.testing.assert_close(got.observed, want.observed, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.predicted, want.predicted, atol=1e-6, rtol=0)
        assert got.observed.abs().max() > 1e-4


def test_a_frozen_clamp_of_a_cross_layer_feature_writes_every_later_layer():
    """With attention and norms held, later MLPs silent and no later feature able to respond,
    clamping layer-0 features moves the logits by exactly their edges, which count their
    writes into every layer: the real run must add the decoder slots of layers 1 and 2."""
    built = model("gpt2")
    tokens = prompt()
    clt = cross_layer(built)
    with torch.no_grad():
        for block in built.blocks[1:]:  # later MLPs write nothing, whatever their input
            block.mlp.W_out.zero_()
            block.mlp.b_out.zero_()
        clt.b_enc[1:] = -1e3  # later layers' features never fire
    graph = attribution_graph(built, clt, tokens)
    assert set(graph.nodes.features[:, 0].tolist()) == {0}
    chosen = [tuple(graph.nodes.features[i].tolist()) for i in (0, len(graph.nodes.features) // 2)]
    check = check_intervention(built, clt, tokens, graph, chosen, [0.0, 3.0], frozen=True)
    torch.testing.assert_close(check.observed, check.predicted, atol=1e-5, rtol=0)
    assert check.observed.abs().max() > 1e-3
    # without the later slots the same clamp moves the logits differently
    with torch.no_grad():
        for slots in clt.W_dec:
            slots[:, 1:] = 0
    own_layer_only = check_intervention(built, clt, tokens, graph, chosen, [0.0, 3.0], frozen=True)
    assert (own_layer_only.observed - check.observed).abs().max() > 1e-4


def test_a_clt_that_does_not_fit_the_model_is_refused_by_name():
    built = model("gpt2")
    tokens = prompt()
    layers = built.cfg.n_layers
    wrong_depth = CrossLayerTranscoder(CLTConfig(n_layers=layers + 1, d_model=32, d_sae=8))
    with pytest.raises(ConfigError, match="spans 4 layers; the model has 3"):
        attribution_graph(built, wrong_depth, tokens)
    wrong_width = CrossLayerTranscoder(CLTConfig(n_layers=layers, d_model=16, d_sae=8))
    with pytest.raises(ShapeMismatchError, match="16 wide"):
        attribution_graph(built, wrong_width, tokens)
    wrong_dtype = CrossLayerTranscoder(
        CLTConfig(n_layers=layers, d_model=32, d_sae=8, dtype="float64")
    )
    with pytest.raises(ConfigError, match="float64"):
        replacement_logits(built, wrong_dtype, tokens)
