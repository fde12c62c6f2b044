"""TransformerLens-style weight properties, stacked over layers.

A weight the model does not have (``W_in`` of an attention-only model)
raises ``UnsupportedModelError``, not ``AttributeError``, because
``nn.Module.__getattr__`` would replace the message with a generic one.

Each property builds a fresh stacked tensor (``torch.stack`` copies), so read
from them freely but edit weights through the per-layer views
(``model.blocks[L].attn.W_Q``), which share storage with the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.factored_matrix import FactoredMatrix


def _zeros_or(param: Tensor | None, like: Tensor, size: int) -> Tensor:
    return param if param is not None else like.new_zeros(size)


class WeightViews:
    """Mixin for the transformer: ``W_E``, ``W_Q [n_layers, n_heads, d_model, d_head]`` and kin."""

    # provided by the transformer; typed Any because nn.Module attribute access is untyped
    cfg: TransformerConfig
    blocks: Any
    embed: Any
    unembed: Any

    def _stack(self, get: Callable[[Any], Tensor]) -> Tensor:
        return torch.stack([get(block) for block in self.blocks])

    def _stack_mlp(self, get: Callable[[Any], Tensor]) -> Tensor:
        if not hasattr(self.blocks[0], "mlp"):
            raise UnsupportedModelError("this model is attention-only: it has no MLP weights")
        if self.cfg.moe is not None:
            raise UnsupportedModelError(
                "this model's MLPs are mixtures of experts, so there is no per-layer neuron "
                "weight to stack; read blocks[L].mlp.W_in / W_gate / W_out "
                "[n_experts, ...] and W_router instead"
            )
        return self._stack(lambda b: get(b.mlp))

    @property
    def W_E(self) -> Tensor:
        """``[d_vocab, d_model]``"""
        return self.embed.W_E

    @property
    def W_pos(self) -> Tensor:
        """``[n_ctx, d_model]`` (learned positions only)."""
        pos_embed = getattr(self, "pos_embed", None)
        if pos_embed is None:
            raise UnsupportedModelError("this model has no learned positional embedding W_pos")
        return pos_embed.W_pos

    @property
    def W_U(self) -> Tensor:
        """``[d_model, d_vocab]``"""
        return self.unembed.W_U

    @property
    def b_U(self) -> Tensor:
        """``[d_vocab]`` (zeros when the model has no unembedding bias)."""
        return _zeros_or(self.unembed.b_U, self.unembed.W_U, self.unembed.W_U.shape[1])

    @property
    def W_Q(self) -> Tensor:
        """``[n_layers, n_heads, d_model, d_head]``"""
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Tensor:
        """``[n_layers, n_kv_heads, d_model, d_head]``"""
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Tensor:
        """``[n_layers, n_kv_heads, d_model, d_head]``"""
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Tensor:
        """``[n_layers, n_heads, d_head, d_model]``"""
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> Tensor:
        """``[n_layers, n_heads, d_head]``"""
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_K(self) -> Tensor:
        """``[n_layers, n_kv_heads, d_head]``"""
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> Tensor:
        """``[n_layers, n_kv_heads, d_head]``"""
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Tensor:
        """``[n_layers, d_model]``"""
        return self._stack(lambda b: b.attn.b_O)

    def _per_query_head(self, kv: Tensor) -> Tensor:
        # grouped-query attention: query head h reads kv head h // group, as the forward does
        return kv.repeat_interleave(self.cfg.kv_group_size, dim=1)

    @property
    def QK(self) -> FactoredMatrix:
        """``[n_layers, n_heads, d_model, d_model]`` factored as ``W_Q @ W_Kᵀ``.

        Row-vector convention: the (unscaled, bias-free) score of query input
        ``x_q`` on key input ``x_k`` is ``x_q @ QK @ x_kᵀ``. Key heads are
        repeated to one per query head for grouped-query models. Linear and
        Performer attention raise ``UnsupportedModelError``: their weights are
        ``phi(q) . phi(k)``, which no bilinear form gives.
        """
        if self.cfg.kernel_attention:
            raise UnsupportedModelError(
                f"QK: attention_type={self.cfg.attention_type!r} weighs keys by "
                "phi(q) . phi(k), not by a bilinear form of the inputs (OV still applies)"
            )
        return FactoredMatrix(self.W_Q, self._per_query_head(self.W_K).mT)

    @property
    def OV(self) -> FactoredMatrix:
        """``[n_layers, n_heads, d_model, d_model]`` factored as ``W_V @ W_O``.

        A head writes ``pattern @ x @ OV`` into the residual stream (biases
        aside). Value heads are repeated to one per query head for grouped-query models.
        """
        return FactoredMatrix(self._per_query_head(self.W_V), self.W_O)

    @property
    def W_in(self) -> Tensor:
        """``[n_layers, d_model, d_mlp]``"""
        return self._stack_mlp(lambda m: m.W_in)

    @property
    def W_gate(self) -> Tensor:
        """``[n_layers, d_model, d_mlp]`` (gated MLPs only)."""
        if self.blocks[0].mlp.W_gate is None:
            raise UnsupportedModelError("this model's MLP is not gated: it has no W_gate")
        return self._stack_mlp(lambda m: m.W_gate)

    @property
    def b_in(self) -> Tensor:
        """``[n_layers, d_mlp]``"""
        return self._stack_mlp(lambda m: _zeros_or(m.b_in, m.W_in, m.W_in.shape[1]))

    @property
    def W_out(self) -> Tensor:
        """``[n_layers, d_mlp, d_model]``"""
        return self._stack_mlp(lambda m: m.W_out)

    @property
    def b_out(self) -> Tensor:
        """``[n_layers, d_model]``"""
        return self._stack_mlp(lambda m: _zeros_or(m.b_out, m.W_out, m.W_out.shape[1]))
