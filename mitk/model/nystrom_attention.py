"""Nyströmformer attention (Xiong et al. 2021) as Hugging Face's ``NystromformerModel`` runs it.

Softmax attention ``softmax(q kᵀ) v`` is approximated through ``L`` landmarks, the means
of ``L`` consecutive segments of the queries (``q~``) and of the keys (``k~``):

    z = K1 pinv(K2) K3 v + conv(v),
    K1 = softmax(q k~ᵀ)  [n, L],  K2 = softmax(q~ k~ᵀ)  [L, L],  K3 = softmax(q~ kᵀ)  [L, n]

(dot products scaled by ``1/sqrt(d_head)``; padded keys are masked in ``K3`` only, so
padding still reaches real tokens through the landmark means and the convolution, as in
Hugging Face's model). ``pinv`` is the iterative Moore-Penrose method of the paper with
Hugging Face's start, ``Z0 = K2ᵀ / m`` where ``m`` is the largest column sum of ``K2`` over
the *whole batch* and every head, so after its fixed number of steps a row's output depends
slightly on the other rows of its batch. ``conv`` is a depthwise convolution of each head's
values along positions (``W_conv [head, taps]``, zero padded, centred).

The factored path never builds an ``n x n`` matrix. ``hook_pattern`` shows the effective
mixing matrix ``P = K1 pinv(K2) K3 + C`` (``C`` the convolution as a banded matrix), so
that ``z = P @ v``; it is built only when a hook reads or holds it, and a replaced pattern
is what mixes the values. Rows of ``P`` do not sum to 1 and its entries can be negative.
There is no ``hook_attn_scores``: no single score matrix exists.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import AttentionBackend, TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.attention import Attention, eager_reason
from mitk.model.forward_context import ForwardContext
from mitk.shapes import Float

FACTORED = "nystrom: factored"

Heads = Float[Tensor, "batch head pos d_head"]


class NystromAttention(Attention):
    """Bidirectional Nyström attention with the hooks of ``Attention`` but ``hook_attn_scores``.

    ``hook_q``/``hook_k``/``hook_v``/``hook_z`` keep their meaning; ``hook_pattern
    [batch, head, query_pos, key_pos]`` is the effective mixing matrix (module docstring).
    With ``cfg.nystrom.exact`` (as many landmarks as Hugging Face's segment length) the
    attention part is exact softmax attention, fused through SDPA unless a hook asks.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        assert cfg.nystrom is not None
        del self.hook_attn_scores  # no single score matrix: refused by name, never silent
        self.W_conv = (
            nn.Parameter(torch.zeros(cfg.n_heads, cfg.nystrom.conv_kernel_size))
            if cfg.nystrom.conv_kernel_size
            else None
        )

    def choose_path(self, backend: AttentionBackend) -> str:
        """The factored form (``"sdpa"`` when exact), or ``"eager: <reason>"`` for the pattern."""
        eager = eager_reason(backend, self.hook_pattern)
        if eager is not None:
            return eager
        assert self.cfg.nystrom is not None
        return "sdpa" if self.cfg.nystrom.exact else FACTORED

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """``[batch, pos, head, d]`` in, ``hook_z`` out; an encoder's: no past state."""
        if ctx.past.get(self.layer) is not None:
            raise UnsupportedModelError("nystrom attention belongs to an encoder: no past state")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        path = self.choose_path(ctx.backend)
        ctx.record_path(self.name, path)
        valid = ctx.mask.key_valid
        if path.startswith("eager"):
            pattern = self.hook_pattern(self._pattern(q, k, ctx))
            z = pattern.to(v.dtype) @ v
        else:
            z = self._factored(q, k, v, valid, ctx)
        return self.hook_z(z.transpose(1, 2))

    def _factored(self, q: Heads, k: Heads, v: Heads, valid: Tensor | None,
                  ctx: ForwardContext) -> Heads:  # fmt: skip
        assert self.cfg.nystrom is not None
        if self.cfg.nystrom.exact:
            allowed = ctx.mask.dense(q.device) if ctx.mask.restricts() else None
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.cfg.attn_scale
            )
        else:
            left, right = self._kernels(q, k, valid)
            z = left @ (right @ v)  # Hugging Face's order: (K1 pinv(K2)) (K3 v)
        if self.W_conv is not None:
            z = z + depthwise_conv(v, self.W_conv)
        return z

    def _kernels(self, q: Heads, k: Heads, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """``K1 pinv(K2)`` ``[batch, head, pos, L]`` and ``K3`` ``[batch, head, L, pos]``."""
        nys, scale = self.cfg.nystrom, self.cfg.attn_scale
        assert nys is not None
        q_land, k_land = landmarks(q, nys.num_landmarks), landmarks(k, nys.num_landmarks)
        k1 = torch.softmax(q @ k_land.mT * scale, dim=-1)
        k2 = torch.softmax(q_land @ k_land.mT * scale, dim=-1)
        scores = q_land @ k.mT * scale
        if valid is not None:
            hidden = ~valid.to(q.device).bool()[:, None, None, :]
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        k3 = torch.softmax(scores, dim=-1)
        return k1 @ iterative_pinv(k2, nys.pinv_iterations), k3

    def _pattern(self, q: Heads, k: Heads, ctx: ForwardContext) -> Float[Tensor, "batch head q k"]:
        """The effective mixing matrix ``P`` with ``z = P @ v`` (module docstring)."""
        assert self.cfg.nystrom is not None
        if self.cfg.nystrom.exact:
            scores = q @ k.mT * self.cfg.attn_scale
            if ctx.mask.restricts():  # as the fused path: padded queries see themselves
                scores = scores.masked_fill(~ctx.mask.dense(q.device), float("-inf"))
            pattern = torch.softmax(scores, dim=-1)
        else:
            left, right = self._kernels(q, k, ctx.mask.key_valid)
            pattern = left @ right
        if self.W_conv is not None:
            pattern = pattern + conv_matrix(self.W_conv, q.shape[2]).to(pattern.dtype)
        return pattern


def landmarks(x: Heads, count: int) -> Float[Tensor, "batch head landmark d_head"]:
    """Means of ``count`` consecutive, equal segments of the positions (queries or keys)."""
    pos = x.shape[2]
    if pos % count:
        raise UnsupportedModelError(
            f"nystrom attention averages {count} landmark segments of equal length: the "
            f"sequence length ({pos}) must be a multiple of num_landmarks"
        )
    return x.unflatten(2, (count, pos // count)).mean(3)


def iterative_pinv(
    mat: Float[Tensor, "batch head n n"], iterations: int
) -> Float[Tensor, "batch head n n"]:
    """Hugging Face's iterative Moore-Penrose inverse of the row-stochastic ``mat``.

    ``Z0 = matᵀ / m`` with ``m`` the largest column sum over the whole batch and every
    head (Hugging Face's ``"original"`` start), then ``iterations`` steps of
    ``Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4``.
    """
    identity = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    z = 1 / torch.max(torch.sum(mat, dim=-2)) * mat.mT
    for _ in range(iterations):
        az = mat @ z
        z = (0.25 * z) @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


def depthwise_conv(v: Heads, weight: Float[Tensor, "head taps"]) -> Heads:
    """Each head's values convolved along positions by its taps (centred, zero padded)."""
    heads, taps = weight.shape
    kernel = weight.to(v.dtype).view(heads, 1, taps, 1)
    return F.conv2d(v, kernel, padding=(taps // 2, 0), groups=heads)


def conv_matrix(weight: Float[Tensor, "head taps"], pos: int) -> Float[Tensor, "head pos pos"]:
    """``depthwise_conv`` as a banded ``[head, query, key]`` matrix (``C`` in ``z = P @ v``)."""
    taps = weight.shape[1]
    t = torch.arange(pos, device=weight.device)
    offset = t[None, :] - t[:, None] + taps // 2  # key - query, shifted to a tap index
    inside = (offset >= 0) & (offset < taps)
    return weight[:, offset.clamp(0, taps - 1)] * inside
