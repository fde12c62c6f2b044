"""Attention sinks (gpt-oss): one learned logit per head that competes in every softmax.

Each head ``h`` has a sink logit ``s_h``; a query's weights are
``exp(score_k) / (sum_j exp(score_j) + exp(s_h))`` over the real keys ``k``, so
they sum to ``1 - p_sink`` and the sink's share ``p_sink`` goes nowhere (it has
no value). ``hook_pattern`` holds those weights and ``hook_sink_prob`` the sink
share, so pattern plus sink is a distribution, and ``pattern / (1 - p_sink)``
the distribution over real keys.

The fused path reaches the same numbers with one extra key. SDPA computes
``scale * q'·k'``; with queries ``q' = [q, s_h / scale]`` and keys ``k' = [k, 0]``
the real scores are unchanged, and an extra key ``[0, ..., 0, 1]`` (always
visible, value zero) scores exactly ``s_h`` for head ``h``: the sink. The extra
key is shared by all heads, so grouped-query attention keeps its shared keys.
"""

from __future__ import annotations

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Bool, Float


def softmax_with_sink(
    scores: Float[Tensor, "batch head q k"], sinks: Float[Tensor, " head"]
) -> tuple[Float[Tensor, "batch head q k"], Float[Tensor, "batch head q"]]:
    """Weights over the real keys and the sink's share, from masked scores and sink logits."""
    sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)
    return probs[..., :-1], probs[..., -1]


def fused_with_sink(
    q: Float[Tensor, "batch head q d"],
    k: Float[Tensor, "batch kv_head k d"],
    v: Float[Tensor, "batch kv_head k d_v"],
    allowed: Bool[Tensor, "mb 1 q k"] | None,
    sinks: Float[Tensor, " head"],
    scale: float,
) -> Float[Tensor, "batch head q d_v"]:
    """``softmax_with_sink`` attention through SDPA with one extra key (see the module docstring).

    ``allowed`` is the visibility of the real keys (None: causal, nothing else).
    """
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    column = (sinks.to(q.dtype) / scale)[None, :, None, None].expand(batch, heads, q_len, 1)
    q = torch.cat([q, column], dim=-1)
    sink_key = F.pad(k.new_ones(batch, kv_heads, 1, 1), (k.shape[-1], 0))  # [0, ..., 0, 1]
    k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)
    v = torch.cat([v.new_zeros(batch, kv_heads, 1, v.shape[-1]), v], dim=2)
    if allowed is None:
        offset = k_len - q_len
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(offset)
        allowed = allowed[None, None]
    sink_visible = allowed.new_ones(*allowed.shape[:-1], 1)
    mask = torch.cat([sink_visible, allowed], dim=-1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads
    )
