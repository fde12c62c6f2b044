"""Targets of a graph recomputed by running the frozen replacement model forward (no gradients)."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk import HookedTransformer
from mitk.analysis.graphs import AttributionGraph, PromptState, TranscoderSet, frozen_forward
from mitk.analysis.graphs.transcoders import dictionaries


def targets(
    model: HookedTransformer,
    transcoders: TranscoderSet,
    state: PromptState,
    graph: AttributionGraph,
    *,
    activations: list[Tensor] | None = None,
    error_scale: float = 1.0,
    embed_scale: float = 1.0,
) -> Tensor:
    """Every target of ``graph`` (feature pre-activations, demeaned logits) under these node values.

    Error terms at positions without features are no nodes: they keep their value.
    """
    layers = dictionaries(model, transcoders)
    acts = list(state.activations) if activations is None else activations
    writes = []
    for layer in range(layers.n_layers):
        scale = torch.full((state.tokens.shape[0], 1), error_scale)
        if not state.first_position_features:
            scale[0] = 1.0
        # a cross-layer transcoder's layer is written by the latents of every layer up to it
        writes.append(layers.decode(layer, acts) + state.errors[layer] * scale)
    with torch.no_grad():
        run = frozen_forward(model, layers, state, state.embed * embed_scale, torch.stack(writes))
    nodes = graph.nodes
    out = torch.zeros(nodes.n_nodes)
    for i, (layer, pos, feature) in enumerate(nodes.features.tolist()):
        out[i] = layers.pre_activations(layer, run.inputs[layer][pos])[feature]
    unembed = model.unembed.W_U
    directions = unembed[:, nodes.logit_tokens] - unembed.mean(-1, keepdim=True)
    out[nodes.logit_start :] = run.hidden[-1] @ directions
    return out
