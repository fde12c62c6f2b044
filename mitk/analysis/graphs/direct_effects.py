"""Rows of an attribution graph: direct effects by batched vector-Jacobian products.

The frozen replacement model runs forward once, differentiable in the token
embeddings and the MLP writes. A target (a feature's encoder direction at its
layer's input, or a demeaned unembedding direction at the last position) is a
cotangent; one backward pass, batched over many targets at once
(``is_grads_batched``), gives every target's gradient at every embedding and
MLP write, and contracting those with the sources' vectors (activation times
decoder row, error vector, token embedding) gives the rows. The forward is
never repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mitk.analysis.graphs.replacement import PromptState, frozen_forward
from mitk.analysis.graphs.transcoders import Transcoder
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int

# bounds the [batch, features, d_model] products formed while contracting (elements)
_CHUNK_ELEMENTS = 1 << 24


class DirectEffects:
    """The frozen model's graph, kept for many backward passes; ``rows`` computes edges.

    Sources are ordered as graph nodes: ``features`` (``[n, 3]``: layer, pos,
    feature), then errors (layer-major), then tokens. Error vectors at
    positions without features are not nodes (zero vectors here).
    """

    def __init__(
        self,
        model: HookedTransformer,
        transcoders: Sequence[Transcoder],
        state: PromptState,
        features: Int[Tensor, "n_features 3"],
        activations: Float[Tensor, " n_features"],
    ) -> None:
        self.n_layers, self.n_pos, self.d_model = state.writes.shape
        with torch.enable_grad():
            self.embed = state.embed.detach().clone().requires_grad_(True)
            self.writes = state.writes.detach().clone().requires_grad_(True)
            run = frozen_forward(model, transcoders, state, self.embed, self.writes)
        self.outputs = [*run.inputs, run.hidden]  # index n_layers: the logits' input
        layer, pos, index = features.unbind(-1)
        self.feature_slots = layer * self.n_pos + pos
        vectors = state.writes.new_zeros(features.shape[0], self.d_model)
        for at, transcoder in enumerate(transcoders):
            chosen = layer == at
            vectors[chosen] = transcoder.W_dec.detach()[index[chosen]]
        self.feature_vectors = vectors * activations[:, None]
        errors = state.errors.clone()
        if not state.first_position_features:
            errors[:, 0] = 0
        self.error_vectors = errors
        self.token_vectors = state.embed
        self.n_sources = features.shape[0] + (self.n_layers + 1) * self.n_pos

    def rows(
        self,
        layers: Int[Tensor, " batch"],
        positions: Int[Tensor, " batch"],
        directions: Float[Tensor, "batch d_model"],
    ) -> Float[Tensor, "batch n_sources"]:
        """Every source's direct effect on each target ``directions[i] · output[layer, pos]``.

        The output is layer ``layers[i]``'s transcoder input at ``positions[i]``;
        ``layers[i] == n_layers`` means the final norm's output (logit targets).
        """
        batch = layers.shape[0]
        wanted = sorted(set(layers.tolist()))
        cotangents = []
        for layer in wanted:
            cotangent = directions.new_zeros(batch, self.n_pos, self.d_model)
            chosen = (layers == layer).nonzero()[:, 0]
            cotangent[chosen, positions[chosen]] = directions[chosen]
            cotangents.append(cotangent)
        grad_embed, grad_writes = torch.autograd.grad(
            [self.outputs[layer] for layer in wanted],
            [self.embed, self.writes],
            cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        out = directions.new_zeros(batch, self.n_sources)
        n_features = self.feature_slots.shape[0]
        if grad_writes is not None:
            flat = grad_writes.reshape(batch, self.n_layers * self.n_pos, self.d_model)
            step = max(1, _CHUNK_ELEMENTS // max(1, batch * self.d_model))
            for start in range(0, n_features, step):
                part = slice(start, min(start + step, n_features))
                slots, vectors = self.feature_slots[part], self.feature_vectors[part]
                out[:, part] = torch.einsum("bnd,nd->bn", flat[:, slots], vectors)
            errors = torch.einsum("blpd,lpd->blp", grad_writes, self.error_vectors)
            out[:, n_features : n_features + self.n_layers * self.n_pos] = errors.flatten(1)
        if grad_embed is not None:
            tokens = torch.einsum("bpd,pd->bp", grad_embed, self.token_vectors)
            out[:, n_features + self.n_layers * self.n_pos :] = tokens
        return out
