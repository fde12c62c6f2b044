"""T5 attention: unscaled scores, a bucketed relative position bias, and cross-attention.

T5 never divides ``q·k`` by ``sqrt(d_head)`` (the scale is folded into the
weights at training time) and adds a learned per-head bias indexed by the
bucketed distance ``key_pos - query_pos``. Only the first layer of each stack
owns the bias table (``RelativePositionBias``); its output is shared by every
layer of that stack. Cross-attention has no position bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import AttentionBackend
from mitk.hooks import HookPoint
from mitk.model.attention import eager_reason
from mitk.model.forward_context import ForwardContext
from mitk.model.linear import affine
from mitk.shapes import Float, Int

# Additive score bias: position bias with -inf where attention is not allowed.
ScoreBias = Float[Tensor, "#batch #head #query_pos key_pos"]


def relative_position_bucket(
    relative_position: Int[Tensor, "query_pos key_pos"],
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> Int[Tensor, "query_pos key_pos"]:
    """T5's bucket of each ``key_pos - query_pos`` (Mesh TensorFlow's scheme).

    Half the buckets hold exact small distances, the rest log-spaced distances
    up to ``max_distance``. Bidirectional (encoder) buckets split by sign;
    causal (decoder) buckets only count keys at or before the query.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float log of 0 is -inf for the small distances; torch.where discards those entries
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """The learned table ``W_rel [bucket, head]`` of one stack; returns ``[1, head, q, k]``."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, causal: bool) -> None:
        super().__init__()
        self.W_rel = nn.Parameter(torch.empty(num_buckets, n_heads))
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.causal = causal

    def forward(self, q_len: int, k_len: int) -> Float[Tensor, "1 head query_pos key_pos"]:
        device = self.W_rel.device
        keys, queries = torch.arange(k_len, device=device), torch.arange(q_len, device=device)
        relative = keys[None] - queries[:, None]  # key_pos - query_pos
        bucket = relative_position_bucket(
            relative, not self.causal, self.num_buckets, self.max_distance
        )
        return self.W_rel[bucket].permute(2, 0, 1)[None]


class T5Attention(nn.Module):
    """Self- or cross-attention of one T5 layer (no biases on the projections).

    Hooks: ``hook_q`` ``[batch, query_pos, head, d_head]``, ``hook_k``/``hook_v``
    ``[batch, key_pos, head, d_head]`` (for cross-attention, key positions are
    encoder positions), ``hook_z`` like ``hook_q``, and ``hook_attn_scores`` /
    ``hook_pattern`` ``[batch, head, query_pos, key_pos]`` (scores include the
    position bias and are -inf where masked). The path taken is recorded in the
    pass's ``ForwardContext``.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        inner = n_heads * d_head
        self.W_q_packed = nn.Parameter(torch.empty(d_model, inner))
        self.W_k_packed = nn.Parameter(torch.empty(d_model, inner))
        self.W_v_packed = nn.Parameter(torch.empty(d_model, inner))
        self.W_o_packed = nn.Parameter(torch.empty(inner, d_model))
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def _heads(self, w: Tensor) -> Tensor:
        return w.view(w.shape[0], self.n_heads, self.d_head).permute(1, 0, 2)

    @property
    def W_Q(self) -> Tensor:
        """``[head, d_model, d_head]`` (a view: editing it edits the model)."""
        return self._heads(self.W_q_packed)

    @property
    def W_K(self) -> Tensor:
        """``[head, d_model, d_head]``"""
        return self._heads(self.W_k_packed)

    @property
    def W_V(self) -> Tensor:
        """``[head, d_model, d_head]``"""
        return self._heads(self.W_v_packed)

    @property
    def W_O(self) -> Tensor:
        """``[head, d_head, d_model]``"""
        return self.W_o_packed.view(self.n_heads, self.d_head, -1)

    def _project(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x [batch, pos, d_model]`` to per-head ``[batch, pos, head, d_head]``."""
        return affine(x, weight, None).view(*x.shape[:2], self.n_heads, self.d_head)

    @property
    def name(self) -> str:
        """Where this module sits in the model (``"decoder.1.cross_attn"``), from its hooks."""
        return self.hook_z.name.rpartition(".")[0]

    def choose_path(self, backend: AttentionBackend) -> str:
        """``"sdpa"`` or ``"eager: <reason>"``, by the same rule as decoder-only attention."""
        return eager_reason(backend, self.hook_attn_scores, self.hook_pattern) or "sdpa"

    def forward(
        self,
        x: Float[Tensor, "batch query_pos d_model"],
        bias: ScoreBias | None,
        ctx: ForwardContext,
        source: Float[Tensor, "batch key_pos d_model"] | None = None,
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """Attend from ``x`` to ``source`` (the encoder output) or, if None, to ``x`` itself.

        ``bias`` is added to the scores: the relative position bias and -inf at
        disallowed keys (None: nothing added, every key visible).
        """
        source = x if source is None else source
        batch, q_len, _ = x.shape
        q = self.hook_q(self._project(x, self.W_q_packed))
        k = self.hook_k(self._project(source, self.W_k_packed))
        v = self.hook_v(self._project(source, self.W_v_packed))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        path = self.choose_path(ctx.backend)
        ctx.record_path(self.name, path)
        if path == "sdpa":
            # a float attn_mask is added to the scores: position bias and padding in one tensor
            attn_mask = None if bias is None else bias.to(q.dtype)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        else:
            scores = q @ k.transpose(-1, -2)
            if bias is not None:
                scores = scores + bias.to(scores.dtype)
            scores = self.hook_attn_scores(scores)
            z = self.hook_pattern(torch.softmax(scores, dim=-1).to(v.dtype)) @ v
        z = self.hook_z(z.transpose(1, 2))
        return affine(z.reshape(batch, q_len, self.n_heads * self.d_head), self.W_o_packed, None)


def score_bias(
    position_bias: Float[Tensor, "1 head query_pos key_pos"] | None,
    allowed: Tensor | None,
) -> ScoreBias | None:
    """Position bias with -inf where ``allowed`` (bool ``[#batch, 1, q, k]``) is False."""
    if allowed is None:
        return position_bias
    if position_bias is None:
        zeros = torch.zeros(allowed.shape, device=allowed.device)
        return zeros.masked_fill(~allowed, float("-inf"))
    return position_bias.masked_fill(~allowed, float("-inf"))
