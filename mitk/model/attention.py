"""Multi-head (and grouped-query) self-attention with a fused and an explicit path.

Weights are stored packed, as one ``[d_model, (n_heads + 2 * n_kv_heads) * d_head]``
matrix, so the projection is one matmul; the per-head TransformerLens views
(``W_Q [head, d_model, d_head]`` ...) are views into that storage, so editing
them in place edits the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import AttentionBackend, RotaryScaling, TransformerConfig
from mitk.errors import ConfigError, HookError
from mitk.hooks import HookPoint
from mitk.model.alibi import alibi_bias, alibi_slopes
from mitk.model.forward_context import ForwardContext
from mitk.model.linear import affine
from mitk.model.masks import AttentionMask
from mitk.model.norms import make_qk_norm
from mitk.model.rotary import apply_rotary, rotary_angles
from mitk.model.sinks import fused_with_sink, softmax_with_sink
from mitk.model.softcap import soft_cap
from mitk.model.sparse_patterns import sparse_allowed
from mitk.shapes import Float

Queries = Float[Tensor, "batch head pos d_head"]
Keys = Float[Tensor, "batch kv_head key_pos d_head"]
# value heads may be narrower than query/key heads (latent attention's v_head_dim)
Values = Float[Tensor, "batch kv_head key_pos d_value"]
Mixed = Float[Tensor, "batch head pos d_value"]


def eager_reason(backend: AttentionBackend, *explicit_only: HookPoint) -> str | None:
    """The fused-attention rule's hook part: why this forward must run eager, or None.

    ``"eager: <reason>"`` when the backend is ``"eager"`` or a hook needs what only
    the explicit path computes (scores, pattern, a sink's share), which the fused
    kernel never materialises. With ``"sdpa"`` forced and such a hook attached it
    raises ``HookError``: refuse, never skip hooks.
    """
    if backend == "eager":
        return "eager: attention_backend='eager'"
    needing = [h.name for h in explicit_only if h.has_hooks]
    if backend == "sdpa" and needing:
        raise HookError(
            f"attention_backend='sdpa' cannot fire {', '.join(needing)}: the fused kernel "
            "computes no scores or pattern; use 'auto' or 'eager'"
        )
    return f"eager: hooked {', '.join(needing)}" if needing else None


class Attention(nn.Module):
    """Self-attention of one layer.

    Hooks: ``hook_q``/``hook_k``/``hook_v``/``hook_z`` ``[batch, pos, head, d_head]``
    (keys and values keep the key-value head count), with rotary positions also
    ``hook_rot_q``/``hook_rot_k`` (same shapes, after rotation by the layer's
    own base and scaling, ``cfg.rotary_of``; unrotated on a no-rotary layer), and
    ``hook_attn_scores`` and ``hook_pattern`` ``[batch, head, query_pos,
    key_pos]`` (scores include any ALiBi bias and soft-capping and are masked
    with -inf), and ``hook_result`` ``[batch, pos, head, d_model]``, each head's
    write ``z @ W_O`` (without ``b_O``; heads plus ``b_O`` give the output),
    computed only when a hook is attached to it (TransformerLens's
    ``use_attn_result``, without the flag). With ``cfg.qk_norm`` (Qwen 3, OLMo 2,
    Cohere, StableLM) queries and keys pass norms ``q_norm``/``k_norm`` (RMSNorms,
    or LayerNorms with weights per head; their own ``hook_scale``/``hook_normalized``:
    ``[..., head, 1]`` per head, ``[batch, pos, 1]`` over the projection) between
    ``hook_q``/``hook_k`` and rotary, and
    ``hook_q_normed``/``hook_k_normed`` (shapes of ``hook_q``/``hook_k``) see the
    normed (weighted) result. Each forward records in its
    ``ForwardContext`` which path ran and why; soft-capped layers
    (``cfg.attn_softcap``) run explicitly, ``"eager: soft-capping"``.

    Positions (rotary angles, ALiBi distances) come from the mask, counted over
    real tokens, so left padding and past keys/values see absolute positions.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        n_q, n_kv, d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.W_qkv = nn.Parameter(torch.empty(cfg.d_model, (n_q + 2 * n_kv) * d_head))
        self.b_qkv = (
            nn.Parameter(torch.zeros((n_q + 2 * n_kv) * d_head)) if cfg.attn_qkv_bias else None
        )
        self.W_o_packed = nn.Parameter(torch.empty(n_q * d_head, cfg.d_model))
        self.b_o_param = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.attn_out_bias else None
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        if cfg.qk_norm != "none":
            # typed as modules: latent attention (a subclass) has its own q_norm, of a latent
            self.q_norm: nn.Module = make_qk_norm(cfg, n_q)
            self.k_norm: nn.Module = make_qk_norm(cfg, n_kv)
            self.hook_q_normed = HookPoint()
            self.hook_k_normed = HookPoint()
        if cfg.positional == "rotary":
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        if cfg.attn_sinks:  # gpt-oss: one logit per head competing in every softmax
            self.sinks = nn.Parameter(torch.zeros(n_q))
            self.hook_sink_prob = HookPoint()
        self.hook_z = HookPoint()
        # n_heads times the output's size: built only for a hook that asks (derived)
        self.hook_result = HookPoint(derived=True)

    # --- TransformerLens-shaped views into the packed weights -------------------------
    def _qkv_slice(self, which: int) -> tuple[int, int, int]:
        n_q, n_kv, d_head = self.cfg.n_heads, self.cfg.n_key_value_heads, self.cfg.d_head
        starts = (0, n_q * d_head, (n_q + n_kv) * d_head)
        heads = (n_q, n_kv, n_kv)
        return starts[which], starts[which] + heads[which] * d_head, heads[which]

    def _w(self, which: int) -> Tensor:
        lo, hi, heads = self._qkv_slice(which)
        return self.W_qkv[:, lo:hi].view(self.cfg.d_model, heads, self.cfg.d_head).permute(1, 0, 2)

    def _b(self, which: int) -> Tensor:
        lo, hi, heads = self._qkv_slice(which)
        if self.b_qkv is None:
            return self.W_qkv.new_zeros(heads, self.cfg.d_head)
        return self.b_qkv[lo:hi].view(heads, self.cfg.d_head)

    @property
    def W_Q(self) -> Tensor:
        """``[head, d_model, d_head]``"""
        return self._w(0)

    @property
    def W_K(self) -> Tensor:
        """``[kv_head, d_model, d_head]``"""
        return self._w(1)

    @property
    def W_V(self) -> Tensor:
        """``[kv_head, d_model, d_head]``"""
        return self._w(2)

    @property
    def b_Q(self) -> Tensor:
        """``[head, d_head]`` (zeros when the model has no q bias)."""
        return self._b(0)

    @property
    def b_K(self) -> Tensor:
        """``[kv_head, d_head]``"""
        return self._b(1)

    @property
    def b_V(self) -> Tensor:
        """``[kv_head, d_head]``"""
        return self._b(2)

    @property
    def W_O(self) -> Tensor:
        """``[head, d_head, d_model]``"""
        return self.W_o_packed.view(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    @property
    def b_O(self) -> Tensor:
        """``[d_model]`` (zeros when the model has no output bias)."""
        return (
            self.b_o_param
            if self.b_o_param is not None
            else self.W_o_packed.new_zeros(self.cfg.d_model)
        )

    # --- forward ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Where this module sits in the model (``"blocks.3.attn"``), from its hooks' names."""
        return self.hook_z.name.rpartition(".")[0]

    def choose_path(self, backend: AttentionBackend) -> str:
        """``"sdpa"`` or ``"eager: <reason>"`` for this forward, per the fused-attention rule."""
        sink_hook = (self.hook_sink_prob,) if self.cfg.attn_sinks else ()
        eager = eager_reason(backend, self.hook_attn_scores, self.hook_pattern, *sink_hook)
        if eager is not None:
            return eager
        if self.cfg.attn_softcap:
            # SDPA has no hook between scores and softmax: a capped layer is computed explicitly
            if backend == "sdpa":
                raise ConfigError(
                    "attention_backend='sdpa' cannot apply attention soft-capping "
                    f"(attn_softcap={self.cfg.attn_softcap}); use 'auto' or 'eager'"
                )
            return "eager: soft-capping"
        return "sdpa"

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend from ``x``'s positions, after any past keys/values ``ctx`` holds for this layer.

        With past state the queries are the last ``pos`` positions of a longer
        sequence (``ctx.mask.k_len`` long); the hooks see only the new
        positions. Past keys are post-rotation (what ``hook_rot_k`` saw) on
        rotary models.
        """
        cfg = self.cfg
        batch, pos, _ = x.shape
        qkv = affine(x, self.W_qkv, self.b_qkv).view(
            batch, pos, cfg.n_heads + 2 * cfg.n_key_value_heads, cfg.d_head
        )
        q, k, v = qkv.split([cfg.n_heads, cfg.n_key_value_heads, cfg.n_key_value_heads], dim=2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cfg.qk_norm != "none":
            q = self.hook_q_normed(self._normed(self.q_norm, q))
            k = self.hook_k_normed(self._normed(self.k_norm, k))
        if cfg.positional == "rotary":
            q, k = self._rotated(q, k, ctx)
        z = self.attend(q, k, v, ctx)
        if self.hook_result.has_hooks:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(2) + self.b_O
        return affine(z.reshape(batch, pos, -1), self.W_o_packed, self.b_o_param)

    def _rotated(self, q: Tensor, k: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """Queries and keys through this layer's rotary (its base and scaling), then the hooks.

        A layer without rotary (``cfg.no_rotary_layers``) passes them through unrotated.
        """
        rotary = self.cfg.rotary_of(self.layer)
        if rotary is not None:
            base, scaling = rotary
            angles = rotary_angles_of(ctx, q.device, self.cfg.rotary_dim, base, scaling)
            scale = 1.0 if scaling is None else scaling.attention_factor
            q = apply_rotary(q, angles, self.cfg.rotary_style, scale)
            k = apply_rotary(k, angles, self.cfg.rotary_style, scale)
        return self.hook_rot_q(q), self.hook_rot_k(k)

    def _normed(
        self, norm: nn.Module, x: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """``x`` through a q/k norm: per head, or over all heads' projection at once."""
        if self.cfg.qk_norm == "projection":
            return norm(x.flatten(2)).view(x.shape)
        return norm(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Mix values by the path ``ctx`` allows; ``[batch, pos, head, d]`` in, ``hook_z`` out.

        Past keys/values are put in front, the full ones handed to ``ctx`` when
        it keeps them, and the path taken is recorded in ``ctx``.
        """
        # [batch, head, pos, d_head] is the layout both paths compute in
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = ctx.with_past(self.layer, k, v)
        path = self.choose_path(ctx.backend)
        ctx.record_path(self.name, path)
        z = self._fused(q, k, v, ctx) if path == "sdpa" else self._explicit(q, k, v, ctx)
        return self.hook_z(z.transpose(1, 2))

    def _allowed(self, mask: AttentionMask, device: torch.device) -> Tensor | None:
        """Boolean ``[batch or 1, 1, q, k]`` visibility, or None when every key is visible."""
        window, cfg = self.cfg.window_of(self.layer), self.cfg
        if cfg.sparse_attention != "none":
            pattern = sparse_allowed(cfg.sparse_attention, cfg.sparse_block, cfg.sparse_summary,
                                     mask.q_len, mask.k_len, device)  # fmt: skip
            return mask.dense(device, window) & pattern
        return mask.dense(device, window) if mask.restricts(window) else None

    def _bias(self, ctx: ForwardContext, device: torch.device) -> Tensor | None:
        """Additive score bias ``[batch or 1, head, q, k]`` (ALiBi), or None."""
        if self.cfg.positional != "alibi":
            return None
        mask, heads = ctx.mask, self.cfg.n_heads

        def build() -> Tensor:
            positions = mask.positions(device)
            return alibi_bias(alibi_slopes(heads), positions[:, -mask.q_len :], positions)

        return ctx.shared("alibi", build)  # the same for every layer: built once per pass

    def _fused(self, q: Queries, k: Keys, v: Values, ctx: ForwardContext) -> Mixed:
        mask = ctx.mask
        gqa = self.cfg.n_key_value_heads != self.cfg.n_heads
        bias = self._bias(ctx, q.device)
        windowed = mask.window_applies(self.cfg.window_of(self.layer))
        if self.cfg.attn_sinks:  # config validation rules out a bias alongside
            allowed = self._allowed(mask, q.device)
            return fused_with_sink(q, k, v, allowed, self.sinks, self.cfg.attn_scale)
        sparse = self.cfg.sparse_attention != "none"
        if mask.is_plain_causal and bias is None and not windowed and not sparse:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.cfg.attn_scale, enable_gqa=gqa
            )
        allowed = self._allowed(mask, q.device)
        attn_mask = allowed
        if bias is not None:  # a float mask is added to the scores: bias and -inf in one tensor
            bias = bias.to(q.dtype)
            attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=self.cfg.attn_scale, enable_gqa=gqa
        )

    def _explicit(self, q: Queries, k: Keys, v: Values, ctx: ForwardContext) -> Mixed:
        mask = ctx.mask
        group = self.cfg.kv_group_size
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.cfg.attn_scale
        if self.cfg.attn_softcap:  # before bias and mask, as Gemma-2 does (tanh(-inf) is finite)
            scores = soft_cap(scores, self.cfg.attn_softcap)
        bias = self._bias(ctx, q.device)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        allowed = self._allowed(mask, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        scores = self.hook_attn_scores(scores)
        if self.cfg.attn_sinks:
            weights, sink_prob = softmax_with_sink(scores, self.sinks)
            self.hook_sink_prob(sink_prob)
        else:
            weights = torch.softmax(scores, dim=-1)
        pattern = self.hook_pattern(weights.to(v.dtype))
        return pattern @ v


def rotary_angles_of(
    ctx: ForwardContext,
    device: torch.device,
    rotary_dim: int,
    base: float,
    scaling: RotaryScaling | None = None,
) -> Tensor:
    """Rotary angles of this pass's query positions, built once per ladder and shared.

    Layers with the same ``(rotary_dim, base, scaling)`` share one table per
    pass (Gemma 3 builds two: local and global). Dynamic scaling reads the
    longest of these positions, so a cached generation step uses the ladder of
    the sequence so far, as Hugging Face does.
    """
    mask = ctx.mask

    def build() -> Tensor:
        positions = mask.positions(device)[:, -mask.q_len :]
        return rotary_angles(positions, rotary_dim, base, scaling)

    angles = ctx.shared(f"rotary:{rotary_dim}:{base!r}:{scaling!r}", build)
    assert angles is not None
    return angles
