"""Rows of an attribution graph: direct effects by batched vector-Jacobian products.

A target (a feature's encoder direction at its layer's transcoder input, or a
demeaned unembedding direction at the last position) is a cotangent of the
frozen replacement model. One backward pass, batched over many targets at
once, gives every target's gradient at every token embedding and MLP write;
contracting those with the sources' vectors (activation times decoder row,
error vector, token embedding) gives the rows. The backward runs through
``FrozenTranspose`` where it covers the model, otherwise through autograd over
one forward of the frozen model kept for every batch (``is_grads_batched``);
either way the forward is never repeated.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mitk.analysis.graphs.replacement import PromptState, frozen_forward
from mitk.analysis.graphs.sources import SourceVectors
from mitk.analysis.graphs.transcoders import Dictionaries, TranscoderSet, dictionaries
from mitk.analysis.graphs.transpose import FrozenTranspose, Sink, covers
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int

Backward = Literal["auto", "transpose", "autograd"]


class DirectEffects:
    """The frozen model's graph, kept for many backward passes; ``rows`` computes edges.

    Sources are ordered as graph nodes: ``features`` (``[n, 3]``: layer, pos,
    feature), then errors (layer-major), then tokens. Error vectors at
    positions without features are not nodes (zero vectors here).
    """

    def __init__(
        self,
        model: HookedTransformer,
        transcoders: TranscoderSet,
        state: PromptState,
        features: Int[Tensor, "n_features 3"],
        activations: Float[Tensor, " n_features"],
        backward: Backward = "auto",
    ) -> None:
        self.n_layers, self.n_pos, self.d_model = state.writes.shape
        layers = dictionaries(model, transcoders)
        if backward == "transpose" and not covers(model):
            raise ValueError("backward='transpose' does not cover this model; use 'autograd'")
        self.transpose = None
        if backward != "autograd" and covers(model):
            self.transpose = FrozenTranspose(model, layers, state)
        else:
            with torch.enable_grad():
                self.embed = state.embed.detach().clone().requires_grad_(True)
                self.writes = state.writes.detach().clone().requires_grad_(True)
                run = frozen_forward(model, layers, state, self.embed, self.writes)
            self.outputs = [*run.inputs, run.hidden]  # index n_layers: the logits' input
        errors = state.errors.clone()
        if not state.first_position_features:
            errors[:, 0] = 0
        writes = _feature_writes(layers, features, activations)
        self.sources = SourceVectors(features.shape[0], writes, errors, state.embed)
        self.n_sources = self.sources.n_sources

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
        # in layer order, the transpose skips the targets below each layer
        order = torch.argsort(layers, stable=True)
        out = directions.new_zeros(layers.shape[0], self.n_sources)

        def sink(layer: int, g: Tensor, start: int) -> None:
            self.sources.contract(out[start:], layer, g)

        if self.transpose is not None:
            self.transpose.grads(layers[order], positions[order], directions[order], sink)
        else:
            self._autograd(layers[order], positions[order], directions[order], sink)
        if bool((order == torch.arange(len(order), device=order.device)).all()):
            return out
        return out[torch.argsort(order)]

    def _autograd(self, layers: Tensor, positions: Tensor, directions: Tensor, sink: Sink) -> None:
        """The gradients by autograd: one batched backward from the targets' outputs."""
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
        if grad_writes is not None:
            for layer in range(self.n_layers):
                sink(layer, grad_writes[:, layer], 0)
        if grad_embed is not None:
            sink(-1, grad_embed, 0)


def _feature_writes(
    transcoders: Dictionaries,
    features: Int[Tensor, "n_features 3"],
    activations: Float[Tensor, " n_features"],
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each layer M: the feature columns writing M, their positions and vectors."""
    layer, pos, index = features.unbind(-1)
    columns = torch.arange(features.shape[0], device=features.device)
    by_source = []
    for source in range(transcoders.n_layers):
        chosen = layer == source
        rows = transcoders.decoder_rows(source, index[chosen])  # [k, span, d_model]
        by_source.append((columns[chosen], pos[chosen], rows * activations[chosen, None, None]))
    writes = []
    for target in range(transcoders.n_layers):
        parts = [
            (cols, at, rows[:, target - source])
            for source, (cols, at, rows) in enumerate(by_source[: target + 1])
            if target - source < rows.shape[1]
        ]
        writes.append(tuple(torch.cat(part) for part in zip(*parts, strict=True)))
    return writes  # type: ignore[return-value]
