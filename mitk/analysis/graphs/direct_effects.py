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

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mitk.analysis.graphs.replacement import PromptState, frozen_forward
from mitk.analysis.graphs.transcoders import Transcoder
from mitk.analysis.graphs.transpose import FrozenTranspose, covers
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
        transcoders: Sequence[Transcoder],
        state: PromptState,
        features: Int[Tensor, "n_features 3"],
        activations: Float[Tensor, " n_features"],
        backward: Backward = "auto",
    ) -> None:
        self.n_layers, self.n_pos, self.d_model = state.writes.shape
        if backward == "transpose" and not covers(model):
            raise ValueError("backward='transpose' does not cover this model; use 'autograd'")
        self.transpose = None
        if backward != "autograd" and covers(model):
            self.transpose = FrozenTranspose(model, transcoders, state)
        else:
            with torch.enable_grad():
                self.embed = state.embed.detach().clone().requires_grad_(True)
                self.writes = state.writes.detach().clone().requires_grad_(True)
                run = frozen_forward(model, transcoders, state, self.embed, self.writes)
            self.outputs = [*run.inputs, run.hidden]  # index n_layers: the logits' input
        layer, pos, index = features.unbind(-1)
        vectors = state.writes.new_zeros(features.shape[0], self.d_model)
        for at, transcoder in enumerate(transcoders):
            chosen = layer == at
            vectors[chosen] = transcoder.W_dec.detach()[index[chosen]]
        self._group_by_slot(layer * self.n_pos + pos, vectors * activations[:, None])
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
        grad_embed: Tensor | None
        grad_writes: Tensor | None
        if self.transpose is not None:
            grad_embed, grad_writes = self.transpose.grads(layers, positions, directions)
        else:
            grad_embed, grad_writes = self._autograd(layers, positions, directions)
        out = directions.new_zeros(batch, self.n_sources)
        n_features = self.n_features
        if grad_writes is not None:
            flat = grad_writes.reshape(batch, self.n_layers * self.n_pos, self.d_model)
            at_slots = flat[:, self.slots].transpose(0, 1)  # [slot, batch, d_model]
            per_slot = torch.bmm(at_slots, self.slot_vectors.transpose(1, 2))
            out[:, :n_features] = per_slot.transpose(0, 1).reshape(batch, -1)[:, self.slot_order]
            errors = torch.einsum("blpd,lpd->blp", grad_writes, self.error_vectors)
            out[:, n_features : n_features + self.n_layers * self.n_pos] = errors.flatten(1)
        if grad_embed is not None:
            tokens = torch.einsum("bpd,pd->bp", grad_embed, self.token_vectors)
            out[:, n_features + self.n_layers * self.n_pos :] = tokens
        return out

    def _autograd(
        self, layers: Tensor, positions: Tensor, directions: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
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
        return grad_embed, grad_writes

    def _group_by_slot(self, slots: Int[Tensor, " n"], vectors: Float[Tensor, "n d_model"]) -> None:
        """Source vectors padded per (layer, position) slot, so one ``bmm`` contracts them all.

        ``slot_vectors [n_slots, widest, d_model]`` holds each occupied slot's
        vectors (zero-padded); ``slot_order`` picks feature ``i``'s entry out of
        the flattened ``[n_slots * widest]`` products.
        """
        self.n_features = int(slots.shape[0])
        occupied, which, counts = torch.unique(slots, return_inverse=True, return_counts=True)
        widest = int(counts.max()) if len(counts) else 0
        order = torch.argsort(which, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(which)
        rank[order] = torch.arange(len(which), device=which.device) - starts[which[order]]
        padded = vectors.new_zeros(len(occupied), widest, self.d_model)
        padded[which, rank] = vectors
        self.slots = occupied
        self.slot_vectors = padded
        self.slot_order = which * widest + rank
