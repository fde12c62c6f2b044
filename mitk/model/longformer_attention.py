"""Longformer self-attention: a sliding window, plus global tokens with projections of their own.

See ``mitk.config.longformer`` for the pattern and ``mitk.model.banded_attention`` for
how it is computed. The fused path never builds a ``[pos, pos]`` matrix; a hook on
``hook_attn_scores`` or ``hook_pattern`` runs the explicit path, whose dense matrices
show the pattern actually used (zeros, and -inf scores, where nothing is computed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.hooks import HookPoint
from mitk.model.attention import Attention
from mitk.model.banded_attention import (
    banded_attention,
    global_rows,
    global_slots,
    longformer_allowed,
    with_global_rows,
)
from mitk.model.forward_context import ForwardContext
from mitk.model.linear import affine
from mitk.shapes import Float

Heads = Float[Tensor, "batch pos head d_head"]


class LongformerAttention(Attention):
    """Attention of one Longformer layer (``cfg.longformer``).

    Hooks as ``Attention``'s, with these meanings: ``hook_q``/``hook_k``/``hook_v``
    are the local projections (Hugging Face's ``query``/``key``/``value``), which
    every non-global query uses, also for the global tokens' keys and values it
    reads; ``hook_q_global``/``hook_k_global``/``hook_v_global`` ``[batch, pos, head,
    d_head]`` are the global projections (``query_global``...) at every position:
    a global token's query (``hook_q_global`` at its position) attends to every
    real key through ``hook_k_global``/``hook_v_global``. They are computed when the
    input has a global token or one of them is hooked. ``hook_attn_scores`` and
    ``hook_pattern`` ``[batch, head, query_pos, key_pos]`` hold each query's row
    as computed: the band and the global columns for a local query, every real key
    for a global one; ``hook_z`` is local rows' ``pattern @ v`` and global rows'
    ``pattern @ v_global``. The output projection is shared.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        width = 3 * cfg.n_heads * cfg.d_head
        self.W_qkv_global = nn.Parameter(torch.empty(cfg.d_model, width))
        self.b_qkv_global = nn.Parameter(torch.zeros(width)) if cfg.attn_qkv_bias else None
        self.hook_q_global = HookPoint()
        self.hook_k_global = HookPoint()
        self.hook_v_global = HookPoint()
        assert cfg.longformer is not None
        self.window = cfg.longformer.one_sided(layer)

    # --- TransformerLens-shaped views of the global projections -------------------------
    def _global_w(self, which: int) -> Tensor:
        width = self.cfg.n_heads * self.cfg.d_head
        cols = self.W_qkv_global[:, which * width : (which + 1) * width]
        return cols.view(self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head).permute(1, 0, 2)

    def _global_b(self, which: int) -> Tensor:
        width = self.cfg.n_heads * self.cfg.d_head
        if self.b_qkv_global is None:
            return self.W_qkv_global.new_zeros(self.cfg.n_heads, self.cfg.d_head)
        return self.b_qkv_global[which * width : (which + 1) * width].view(self.cfg.n_heads, -1)

    @property
    def W_Q_global(self) -> Tensor:
        """``[head, d_model, d_head]``: the global tokens' query projection (``query_global``)."""
        return self._global_w(0)

    @property
    def W_K_global(self) -> Tensor:
        """``[head, d_model, d_head]``: the keys global queries read (``key_global``)."""
        return self._global_w(1)

    @property
    def W_V_global(self) -> Tensor:
        """``[head, d_model, d_head]``: the values global queries read (``value_global``)."""
        return self._global_w(2)

    @property
    def b_Q_global(self) -> Tensor:
        """``[head, d_head]``"""
        return self._global_b(0)

    @property
    def b_K_global(self) -> Tensor:
        """``[head, d_head]``"""
        return self._global_b(1)

    @property
    def b_V_global(self) -> Tensor:
        """``[head, d_head]``"""
        return self._global_b(2)

    # --- forward ----------------------------------------------------------------------
    def _heads(self, x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Heads, Heads, Heads]:
        batch, pos, _ = x.shape
        qkv = affine(x, w, b).view(batch, pos, 3 * self.cfg.n_heads, self.cfg.d_head)
        q, k, v = qkv.chunk(3, dim=2)
        return q, k, v

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend from every position of ``x`` (an encoder: no past state)."""
        if self.layer in ctx.past or ctx.present is not None:
            # every key sees later positions too: a cache of earlier keys would go stale
            raise UnsupportedModelError(
                "Longformer attention is bidirectional: it keeps no key-value cache "
                "(generate with use_past_kv_cache=False)"
            )
        q, k, v = self._heads(x, self.W_qkv, self.b_qkv)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        hooks = (self.hook_q_global, self.hook_k_global, self.hook_v_global)
        glob = None
        if ctx.global_tokens is not None or any(h.has_hooks for h in hooks):
            projected = self._heads(x, self.W_qkv_global, self.b_qkv_global)
            glob = tuple(h(t) for h, t in zip(hooks, projected, strict=True))
        z = self.hook_z(self._attend(q, k, v, glob, ctx).transpose(1, 2))
        if self.hook_result.has_hooks:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(2) + self.b_O
        return affine(z.flatten(2), self.W_o_packed, self.b_o_param)

    def _attend(
        self, q: Heads, k: Heads, v: Heads, glob: tuple[Tensor, ...] | None, ctx: ForwardContext
    ) -> Float[Tensor, "batch head pos d_head"]:
        """Mixed values ``[batch, head, pos, d_head]`` by the path the hooks allow."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gq, gk, gv = (None, None, None) if glob is None else (t.transpose(1, 2) for t in glob)
        path = self.choose_path(ctx.backend)
        g = ctx.global_tokens
        if path != "sdpa":
            ctx.record_path(self.name, path)
            return self._explicit_rows(q, k, v, (gq, gk, gv), ctx)
        key_valid = ctx.mask.key_valid
        n = q.shape[2]
        band_keys = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
        if key_valid is not None:
            band_keys = band_keys & key_valid.to(q.device)
        slots = None
        if g is not None:
            band_keys = band_keys & ~g
            slots = global_slots(g)
        ctx.record_path(self.name, f"sdpa: banded, window {2 * self.window}"
                        + ("" if g is None else " + global tokens"))  # fmt: skip
        z = banded_attention(q, k, v, self.window, band_keys, slots, self.cfg.attn_scale)
        if g is None or slots is None:
            return z
        assert gq is not None and gk is not None and gv is not None
        z_global = global_rows(gq, gk, gv, slots, key_valid, self.cfg.attn_scale)
        return with_global_rows(z, z_global, g, slots)

    def _explicit_rows(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        glob: tuple[Tensor | None, Tensor | None, Tensor | None],
        ctx: ForwardContext,
    ) -> Float[Tensor, "batch head pos d_head"]:
        """Dense scores and pattern (the hooks see them); global rows use the global projections."""
        g, (gq, gk, gv) = ctx.global_tokens, glob
        scores = (q @ k.transpose(-1, -2)) * self.cfg.attn_scale
        rows = None
        if g is not None:
            assert gq is not None and gk is not None
            rows = g[:, None, :, None]
            scores = torch.where(rows, (gq @ gk.transpose(-1, -2)) * self.cfg.attn_scale, scores)
        allowed = longformer_allowed(q.shape[2], self.window, ctx.mask.key_valid, g, q.device)
        scores = self.hook_attn_scores(scores.masked_fill(~allowed, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1).to(v.dtype))
        if rows is None:
            return pattern @ v
        assert gv is not None
        return torch.where(rows, pattern @ gv, pattern @ v)
