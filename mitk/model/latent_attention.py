"""Multi-head latent attention (MLA, DeepSeek-V2): keys and values from one low-rank latent.

Per position, ``W_kv_a`` compresses the stream into a ``kv_lora_rank`` latent
(RMS-normed, the only per-token state a KV cache needs) plus one rotary key
part shared by every head ("decoupled" rotary keys). ``W_kv_b`` up-projects the
latent to each head's non-rotary key and its value. Queries come from ``W_q_packed``
or, with ``q_lora_rank > 0``, from ``W_q_b(norm(W_q_a x))``. Each query/key head
is ``[non-rotary (d_head - rotary_dim), rotary (rotary_dim)]``; rotary angles
rotate only the trailing part. Value heads are ``v_head_dim`` wide, which may
differ from ``d_head``.
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.hooks import HookPoint
from mitk.model.attention import Attention, rotary_angles_of
from mitk.model.forward_context import ForwardContext
from mitk.model.linear import affine
from mitk.model.rotary import apply_rotary
from mitk.shapes import Float


class LatentNorm(nn.Module):
    """RMSNorm over a latent's width; weight ``w``, no hooks (``hook_kv_latent`` is after it)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(width))

    def forward(self, x: Float[Tensor, "*lead width"]) -> Float[Tensor, "*lead width"]:
        # statistics in fp32, as the reference does, so low precision matches it
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.w


class LatentAttention(Attention):
    """DeepSeek-V2 multi-head latent attention of one layer.

    Hooks (``d_qk = d_head``, ``d_v = v_head_dim``):

    - ``hook_kv_latent`` ``[batch, pos, kv_lora_rank]``: the key-value latent
      *after* its RMSNorm, i.e. exactly what ``W_kv_b`` reads; replacing it
      changes every head's non-rotary keys and values (not the rotary keys).
    - ``hook_q`` ``[batch, pos, head, d_qk]`` and ``hook_k`` ``[batch, pos,
      head, d_qk]`` before rotation (the rotary key part, shared over heads, is
      repeated per head here); ``hook_rot_q``/``hook_rot_k`` the same after it.
    - ``hook_v`` and ``hook_z`` ``[batch, pos, head, d_v]``.
    - ``hook_attn_scores``/``hook_pattern`` ``[batch, head, query_pos,
      key_pos]`` (explicit path only, chosen as in ``Attention``).

    The path choice, masking and both attention kernels are ``Attention``'s
    (SDPA accepts a value width different from the query/key width), and
    the path taken is recorded in the ``ForwardContext``. Past state holds rotated keys
    ``[batch, head, past, d_qk]`` and values ``[batch, head, past, d_v]``. The
    TransformerLens weight views (``W_Q``, ``W_K``, ``W_V``, ``W_O`` and
    biases) raise ``UnsupportedModelError``: MLA has no per-head key/value
    matrices from the residual stream.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__(cfg, layer)  # hooks and the attention kernels
        # the packed q/k/v projection does not exist here; MLA's own projections replace it
        del self.W_qkv
        del self.b_qkv
        n, d_qk, d_v = cfg.n_heads, cfg.d_head, cfg.v_head_dim
        rank, d_rope = cfg.kv_lora_rank, cfg.rotary_dim
        if cfg.q_lora_rank:
            self.W_q_a = nn.Parameter(torch.empty(cfg.d_model, cfg.q_lora_rank))
            self.b_q_a = nn.Parameter(torch.zeros(cfg.q_lora_rank)) if cfg.attn_qkv_bias else None
            self.q_norm = LatentNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.W_q_b = nn.Parameter(torch.empty(cfg.q_lora_rank, n * d_qk))
        else:
            self.W_q_packed = nn.Parameter(torch.empty(cfg.d_model, n * d_qk))
        # columns: [latent (kv_lora_rank), shared rotary key (rotary_dim)]
        self.W_kv_a = nn.Parameter(torch.empty(cfg.d_model, rank + d_rope))
        self.b_kv_a = nn.Parameter(torch.zeros(rank + d_rope)) if cfg.attn_qkv_bias else None
        self.kv_norm = LatentNorm(rank, cfg.latent_norm_eps)
        # columns per head: [non-rotary key (d_qk - rotary_dim), value (d_v)]
        self.W_kv_b = nn.Parameter(torch.empty(rank, n * (d_qk - d_rope + d_v)))
        self.W_o_packed = nn.Parameter(torch.empty(n * d_v, cfg.d_model))
        self.hook_kv_latent = HookPoint()

    # --- the TransformerLens views: only W_O/b_O exist for MLA ------------------------
    def _refuse(self, what: str) -> NoReturn:
        raise UnsupportedModelError(
            f"{what} is not defined for multi-head latent attention (attention_type='mla'): "
            "keys and values come from a shared latent (see W_kv_a, W_kv_b); "
            "analyses built on W_Q/W_K/W_V do not apply (W_O and per-head writes do)"
        )

    @property
    def W_Q(self) -> Tensor:
        return self._refuse("W_Q")

    @property
    def W_K(self) -> Tensor:
        return self._refuse("W_K")

    @property
    def W_V(self) -> Tensor:
        return self._refuse("W_V")

    @property
    def W_O(self) -> Tensor:
        """``[head, v_head_dim, d_model]``: each head's output map (the one ordinary view)."""
        return self.W_o_packed.view(self.cfg.n_heads, self.cfg.v_head_dim, self.cfg.d_model)

    @property
    def b_Q(self) -> Tensor:
        return self._refuse("b_Q")

    @property
    def b_K(self) -> Tensor:
        return self._refuse("b_K")

    @property
    def b_V(self) -> Tensor:
        return self._refuse("b_V")

    @property
    def b_O(self) -> Tensor:
        """``[d_model]`` (zeros when the model has no output bias)."""
        bias = self.b_o_param
        return bias if bias is not None else self.W_o_packed.new_zeros(self.cfg.d_model)

    # --- forward ----------------------------------------------------------------------
    def _queries(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos qk"]:
        if self.cfg.q_lora_rank:
            return affine(self.q_norm(affine(x, self.W_q_a, self.b_q_a)), self.W_q_b, None)
        return affine(x, self.W_q_packed, None)

    def _rotate(
        self, x: Float[Tensor, "batch pos head d_qk"], angles: Tensor
    ) -> Float[Tensor, "batch pos head d_qk"]:
        """Rotate the trailing ``rotary_dim`` of every head; the leading part passes through."""
        nope = self.cfg.d_head - self.cfg.rotary_dim
        rotated = apply_rotary(x[..., nope:], angles, self.cfg.rotary_style)
        return torch.cat([x[..., :nope], rotated], dim=-1)

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend from ``x``'s positions (see the class docstring for hooks and past state)."""
        cfg = self.cfg
        batch, pos, _ = x.shape
        n, d_qk, d_v, d_rope = cfg.n_heads, cfg.d_head, cfg.v_head_dim, cfg.rotary_dim
        q = self.hook_q(self._queries(x).view(batch, pos, n, d_qk))
        latent, k_rope = affine(x, self.W_kv_a, self.b_kv_a).split(
            [cfg.kv_lora_rank, d_rope], dim=-1
        )
        latent = self.hook_kv_latent(self.kv_norm(latent))
        k_nope, v = (
            affine(latent, self.W_kv_b, None)
            .view(batch, pos, n, d_qk - d_rope + d_v)
            .split([d_qk - d_rope, d_v], dim=-1)
        )
        # the one rotary key per position is shared by every head
        k_rope = k_rope[:, :, None].expand(batch, pos, n, d_rope)
        k = self.hook_k(torch.cat([k_nope, k_rope], dim=-1))
        v = self.hook_v(v)
        angles = rotary_angles_of(ctx, x.device, d_rope, cfg.rotary_base)
        q = self.hook_rot_q(self._rotate(q, angles))
        k = self.hook_rot_k(self._rotate(k, angles))
        z = self.attend(q, k, v, ctx)
        return affine(z.reshape(batch, pos, n * d_v), self.W_o_packed, self.b_o_param)
