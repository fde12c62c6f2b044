"""Capped graphs, logit selection, pruning a real graph, and refusals of inputs that do not fit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk.analysis.graphs import (
    attribution_graph,
    graph_scores,
    prune_graph,
    salient_logits,
)
from mitk.errors import ConfigError, InvalidTokensError, ShapeMismatchError
from mitk.sae import SAEConfig, SparseAutoencoder
from tests.unit.graphs.models import D_SAE, model, prompt, transcoders

BUILT = model()
LAYERS = transcoders(BUILT, skip=True)
FULL = attribution_graph(BUILT, LAYERS, prompt())


def test_a_capped_graph_keeps_the_features_the_logits_read_most_with_the_same_edges():
    cap = 12
    capped = attribution_graph(BUILT, LAYERS, prompt(), max_feature_nodes=cap, batch_size=5)
    nodes = FULL.nodes
    # one ranking round (2048 features) picks all 12 at once, ranked by the logit rows alone
    logit_rows = FULL.adjacency[nodes.logit_start :].abs()
    share = logit_rows / logit_rows.sum(1, keepdim=True)
    ranking = (nodes.logit_probabilities @ share)[: nodes.n_features].argsort(descending=True)
    chosen = ranking[:cap].sort().values
    assert torch.equal(capped.nodes.features, nodes.features[chosen])
    kept = torch.cat([chosen, torch.arange(nodes.n_features, nodes.n_nodes)])
    torch.testing.assert_close(capped.adjacency, FULL.adjacency[kept][:, kept], atol=1e-6, rtol=0)
    torch.testing.assert_close(capped.target_values, FULL.target_values[kept])


def test_a_cap_larger_than_one_ranking_round_still_gives_exact_rows():
    capped = attribution_graph(
        BUILT, LAYERS, prompt(), max_feature_nodes=30, ranking_round=8, batch_size=3
    )
    nodes = FULL.nodes
    index = [nodes.feature_index(*f) for f in capped.nodes.features.tolist()]
    kept = torch.cat([torch.tensor(index), torch.arange(nodes.n_features, nodes.n_nodes)])
    assert capped.nodes.n_features == 30
    torch.testing.assert_close(capped.adjacency, FULL.adjacency[kept][:, kept], atol=1e-6, rtol=0)


def test_logits_are_the_likeliest_until_the_probability_is_reached():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05]))
    tokens, probs = salient_logits(logits, 10, 0.8)
    assert tokens.tolist() == [1, 2] and probs.tolist() == pytest.approx([0.5, 0.3])
    assert salient_logits(logits, 10, 0.81)[0].tolist() == [1, 2, 3]
    assert salient_logits(logits, 2, 0.99)[0].tolist() == [1, 2]  # the cap wins
    assert FULL.nodes.logit_probabilities.sum() >= 0.95 or FULL.nodes.n_logits == 10


def test_pruning_a_real_graph_keeps_tokens_and_logits_and_scores_lie_in_0_1():
    pruned = prune_graph(FULL)
    nodes = FULL.nodes
    assert pruned.node_mask[nodes.token_start :].all()
    assert 0 < int(pruned.node_mask[: nodes.n_features].sum()) < nodes.n_features
    scores = graph_scores(FULL)
    assert 0 < scores.replacement < 1 and 0 < scores.completeness < 1
    frame = nodes.to_frame()
    assert len(frame) == nodes.n_nodes
    assert set(frame["kind"]) == {"feature", "error", "token", "logit"}
    edges = FULL.to_frame(min_abs=1e-3)
    assert len(edges) == int((FULL.adjacency.abs() > 1e-3).sum())
    assert set(edges["target_kind"]) == {"feature", "logit"}
    row = edges.iloc[0]
    assert row["weight"] == pytest.approx(float(FULL.adjacency[row["target"], row["source"]]))
    assert row["source_kind"] == frame.loc[row["source"], "kind"]


@settings(max_examples=20)
@given(pos=st.integers(0, 8), bad=st.one_of(st.integers(40, 10**6), st.integers(-(10**6), -1)))
def test_tokens_outside_the_vocabulary_are_refused(pos: int, bad: int):
    tokens = prompt()
    tokens[pos] = bad
    with pytest.raises(InvalidTokensError, match="outside the vocabulary"):
        attribution_graph(BUILT, LAYERS, tokens)


@settings(max_examples=10)
@given(missing=st.sets(st.integers(0, 2), min_size=1))
def test_missing_layers_are_named(missing: set[int]):
    given_layers = {layer: sae for layer, sae in enumerate(LAYERS) if layer not in missing}
    with pytest.raises(
        ConfigError, match=rf"no transcoder for layers \[{', '.join(map(str, sorted(missing)))}\]"
    ):
        attribution_graph(BUILT, given_layers, prompt())


def test_transcoders_that_do_not_fit_are_refused_by_name():
    wrong_hook = list(LAYERS)
    wrong_hook[1] = LAYERS[2]  # reads blocks.2
    with pytest.raises(ConfigError, match=r"layer 1 reads 'blocks\.2\.ln2\.hook_normalized'"):
        attribution_graph(BUILT, wrong_hook, prompt())
    cfg = SAEConfig(d_in=16, d_sae=D_SAE, architecture="relu", d_out=16,
                    hook_name="blocks.0.ln2.hook_normalized",
                    target_hook_name="blocks.0.hook_mlp_out")  # fmt: skip
    narrow = [SparseAutoencoder(cfg), *LAYERS[1:]]
    with pytest.raises(ShapeMismatchError, match="layer 0 maps width 16"):
        attribution_graph(BUILT, narrow, prompt())
    with pytest.raises(InvalidTokensError, match="one prompt"):
        attribution_graph(BUILT, LAYERS, torch.stack([prompt(), prompt()]))
    with pytest.raises(ConfigError, match="layers \\[3\\] that do not exist"):
        attribution_graph(BUILT, {**dict(enumerate(LAYERS)), 3: LAYERS[0]}, prompt())
    with pytest.raises(ValueError, match="max_logits"):
        attribution_graph(BUILT, LAYERS, prompt(), max_logits=0)
