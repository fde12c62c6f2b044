"""``attribution_graph``: the exact attribution graph of one prompt, circuit-tracer's way."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mitk.analysis.graphs.direct_effects import DirectEffects
from mitk.analysis.graphs.influence import partial_influence
from mitk.analysis.graphs.nodes import AttributionGraph, GraphNodes
from mitk.analysis.graphs.replacement import PromptState, prompt_state
from mitk.analysis.graphs.transcoders import Dictionaries, TranscoderSet, dictionaries
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int


@torch.no_grad()
def attribution_graph(
    model: HookedTransformer,
    transcoders: TranscoderSet,
    tokens: Int[Tensor, "..."],
    *,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    ranking_round: int = 2048,
    first_position_features: bool = False,
) -> AttributionGraph:
    """Direct effects between features, errors, tokens and logits of ``tokens``' replacement model.

    - ``transcoders``: one per layer (list or ``{layer: transcoder}``), each
      reading its layer's MLP input and writing ``hook_mlp_out``; or one
      cross-layer transcoder, whose features' edges sum over every layer they write.
    - ``tokens``: one prompt, ``[pos]`` or ``[1, pos]``.
    - Logit nodes: the most likely next tokens at the last position until their
      probabilities sum to ``logit_probability``, at most ``max_logits``.
    - ``max_feature_nodes``: keep only this many features, chosen by their
      influence on the logits as the rows come in (as circuit-tracer does).
    - ``ranking_round``: with a cap, how many features are taken per ranking
      (circuit-tracer's ``update_interval x batch_size``, 4 x 512 by default):
      it decides which features a capped graph keeps.
    - ``batch_size``: targets per backward pass (memory ~ batch x one pass's
      activations); it changes no result.
    - ``first_position_features=False``: position 0 (BOS) has no features,
      as in circuit-tracer.
    """
    if max_logits < 1:
        raise ValueError(f"max_logits must be at least 1, got {max_logits}")
    if not 0.0 < logit_probability <= 1.0:
        raise ValueError(f"logit_probability must be in (0, 1], got {logit_probability}")
    if max_feature_nodes is not None and max_feature_nodes < 1:
        raise ValueError(f"max_feature_nodes must be None or at least 1, got {max_feature_nodes}")
    for name, value in (("batch_size", batch_size), ("ranking_round", ranking_round)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    layers = dictionaries(model, transcoders)
    state = prompt_state(model, layers, tokens, first_position_features=first_position_features)
    features, activations = active_features(state)
    logit_tokens, probabilities = salient_logits(state.logits, max_logits, logit_probability)
    effects = DirectEffects(model, layers, state, features, activations)
    n_pos, n_layers = state.tokens.shape[0], layers.n_layers
    # targets: logits first (at the final norm's output, last position), then features
    unembed = model.unembed.W_U.detach()
    logit_directions = (unembed[:, logit_tokens] - unembed.mean(-1, keepdim=True)).T
    encoders = _encoder_rows(layers, features)
    n_logits, n_features = logit_tokens.shape[0], features.shape[0]
    logit_rows = effects.rows(
        features.new_full((n_logits,), n_layers),
        features.new_full((n_logits,), n_pos - 1),
        logit_directions,
    )
    keep = _chosen_features(effects, features, encoders, logit_rows, probabilities,
                            max_feature_nodes, ranking_round, batch_size)  # fmt: skip
    feature_rows = keep.rows
    chosen = keep.chosen
    sources = torch.cat([chosen, torch.arange(n_features, effects.n_sources, device=chosen.device)])
    kept_features = features[chosen]
    nodes = GraphNodes(
        tokens=state.tokens,
        n_layers=n_layers,
        features=kept_features,
        activations=activations[chosen],
        logit_tokens=logit_tokens,
        logit_probabilities=probabilities,
    )
    adjacency = keep.adjacency
    if adjacency is None:
        adjacency = logit_rows.new_zeros(nodes.n_nodes, nodes.n_nodes)
        adjacency[: len(chosen), : nodes.logit_start] = feature_rows[:, sources]
    adjacency[nodes.logit_start :, : nodes.logit_start] = logit_rows[:, sources]
    values = adjacency.new_zeros(nodes.n_nodes)
    values[: len(chosen)] = _feature_pre_activations(state, layers, kept_features)
    values[nodes.logit_start :] = logit_directions @ state.hidden[-1]
    return AttributionGraph(nodes=nodes, adjacency=adjacency, target_values=values)


def active_features(state: PromptState) -> tuple[Int[Tensor, "n 3"], Float[Tensor, " n"]]:
    """``(layer, pos, feature)`` of every non-zero activation, layer-major, and the activations."""
    found, values = [], []
    for layer, acts in enumerate(state.activations):
        where = acts.nonzero()
        found.append(torch.cat([where.new_full((len(where), 1), layer), where], dim=1))
        values.append(acts[where[:, 0], where[:, 1]])
    return torch.cat(found), torch.cat(values)


def salient_logits(
    logits: Float[Tensor, " d_vocab"], max_logits: int, probability: float
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
    """Likeliest tokens until their probabilities reach ``probability`` (``max_logits`` at most)."""
    probs = torch.softmax(logits, -1)
    top, index = torch.topk(probs, min(max_logits, probs.shape[0]))
    reached = top.cumsum(0).cpu()
    cutoff = int(torch.searchsorted(reached, torch.tensor(probability, dtype=reached.dtype))) + 1
    return index[:cutoff], top[:cutoff]


class _Chosen(NamedTuple):
    chosen: Tensor  # indices into the active features, ascending
    rows: Tensor  # their rows, [n_chosen, n_sources]
    adjacency: Tensor | None = None  # every feature chosen: the graph's, rows filled in


def _chosen_features(
    effects: DirectEffects,
    features: Tensor,
    encoders: Tensor,
    logit_rows: Tensor,
    probabilities: Tensor,
    cap: int | None,
    ranking_round: int,
    batch_size: int,
) -> _Chosen:
    """Rows of every feature, or of the ``cap`` most influential (ranked as rows come in)."""
    n_features = features.shape[0]
    layer, pos = features[:, 0], features[:, 1]
    if cap is None or cap >= n_features:
        # every feature stays: rows go straight into the graph's adjacency (one n x n buffer)
        n_nodes = effects.n_sources + logit_rows.shape[0]
        adjacency = logit_rows.new_zeros(n_nodes, n_nodes)
        rows = adjacency[:n_features, : effects.n_sources]
        for start in range(0, n_features, batch_size):
            part = slice(start, start + batch_size)
            rows[part] = effects.rows(layer[part], pos[part], encoders[part])
        return _Chosen(torch.arange(n_features, device=features.device), rows, adjacency)
    n_logits = logit_rows.shape[0]
    n_nodes = effects.n_sources + n_logits
    weights = logit_rows.new_zeros(n_nodes)
    weights[effects.n_sources :] = probabilities
    known = torch.cat([logit_rows, logit_rows.new_zeros(n_logits, n_logits)], dim=1)
    row_nodes = torch.arange(effects.n_sources, n_nodes, device=features.device)
    visited = torch.zeros(n_features, dtype=torch.bool, device=features.device)
    order: list[Tensor] = []
    done = 0
    while done < cap:
        ranking = partial_influence(known, row_nodes, weights)[:n_features].argsort(descending=True)
        pending = ranking[~visited[ranking]][: min(ranking_round, cap - done)]
        # in node order (layer, then position), each batch stops at its last layer and position
        pending = pending.sort().values
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            rows = effects.rows(layer[batch], pos[batch], encoders[batch])
            known = torch.cat([known, torch.cat([rows, rows.new_zeros(len(batch), n_logits)], 1)])
            row_nodes = torch.cat([row_nodes, batch])
            visited[batch] = True
            order.append(batch)
        done += len(pending)
    chosen = torch.cat(order)
    sorted_chosen, position = chosen.sort()
    rows = known[n_logits:, : effects.n_sources][position]
    return _Chosen(sorted_chosen, rows)


def _encoder_rows(layers: Dictionaries, features: Tensor) -> Float[Tensor, "n d_model"]:
    """Each feature's encoder direction (the target vector of its row); features layer-major."""
    return torch.cat([
        layers.encoder_rows(at, features[features[:, 0] == at, 2]) for at in range(layers.n_layers)
    ])  # fmt: skip


def _feature_pre_activations(
    state: PromptState, layers: Dictionaries, features: Tensor
) -> Float[Tensor, " n"]:
    """Each feature node's pre-activation on the prompt (its row's target value)."""
    out = state.writes.new_zeros(features.shape[0])
    for at in range(layers.n_layers):
        chosen = (features[:, 0] == at).nonzero()[:, 0]
        if len(chosen):
            pre = layers.pre_activations(at, state.inputs[at][features[chosen, 1]])
            out[chosen] = pre.gather(1, features[chosen, 2:3])[:, 0]
    return out
