"""Kernel linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Causal softmax attention weighs value ``s`` for query ``t`` by ``exp(q_t . k_s)``;
linear attention uses ``phi(q_t) . phi(k_s)`` with the positive feature map
``phi(x) = elu(x) + 1``, so that

    z_t = phi(q_t) S_t / (phi(q_t) . u_t),
    S_t = sum_{s <= t} phi(k_s) v_s^T   [d_head, d_head],
    u_t = sum_{s <= t} phi(k_s)         [d_head].

Two forms compute it. The *recurrent* form carries ``(S, u)`` along the sequence,
chunk by chunk (within a chunk the causal products are explicit, so the work is
``pos * (chunk + d_head) * d_head`` per head and nothing ``pos x pos`` is built);
generation carries the same state, constant in size. The *explicit* form builds
the ``[q, k]`` matrix of normalised weights, which ``hook_pattern`` shows (zeros
where a key is not visible), and runs whenever a hook reads scores or pattern,
or the backend is ``eager``. Both agree to float rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.config import AttentionBackend
from mitk.model.attention import Attention, eager_reason
from mitk.model.forward_context import ForwardContext
from mitk.shapes import Float

RECURRENT = "linear: recurrent"
CHUNK = 64
"""Positions per chunk of the recurrent form: explicit ``chunk x chunk`` products inside."""


class LinearAttentionState(NamedTuple):
    """One linear-attention layer's state after the positions seen so far (per key/value head).

    It takes the place of the layer's keys and values in ``ForwardContext.past``/
    ``present`` and in a ``KVCache``: constant size, whatever the sequence length.
    """

    kv: Float[Tensor, "batch kv_head features d_head"]
    """``S``: the sum of ``phi(k_s) v_s^T`` over the positions seen."""
    k_sum: Float[Tensor, "batch kv_head features"]
    """``u``: the sum of ``phi(k_s)``, the normaliser's state."""


def feature_map(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1``: positive, so every weight and normaliser is positive."""
    return F.elu(x) + 1


class LinearAttention(Attention):
    """Causal kernel linear attention with the hooks of ``Attention``.

    ``hook_q``/``hook_k``/``hook_v`` see the projections before ``phi``;
    ``hook_attn_scores [batch, head, q, k]`` the unnormalised ``phi(q) . phi(k)``
    (zero where not visible) and ``hook_pattern`` those divided by each query's
    normaliser, so that ``z = pattern @ v``. When the pass continues a cached
    state, the pattern covers the new keys only, and a row sums to the share of
    the normaliser they hold. Padding keys (``ctx.mask.key_valid``) contribute
    nothing to either form or to the state.
    """

    def choose_path(self, backend: AttentionBackend) -> str:
        """``"linear: recurrent"``, or ``"eager: <reason>"`` when the weights must be built."""
        eager = eager_reason(backend, self.hook_attn_scores, self.hook_pattern)
        return eager if eager is not None else RECURRENT

    def features(self, x: Tensor, queries: bool) -> Tensor:
        """``phi`` of queries or keys ``[batch, pos, head, d_head]``: ``elu + 1`` here."""
        return feature_map(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """``[batch, pos, head, d]`` in; ``hook_z`` out; the state handed to ``ctx`` if kept."""
        batch, pos = q.shape[:2]
        kv_heads, group = self.cfg.n_key_value_heads, self.cfg.kv_group_size
        # [batch, kv_head, group, pos, f] for queries, [batch, kv_head, pos, f] for keys
        fq = self.features(q, queries=True)
        width = fq.shape[-1]
        fq = fq.view(batch, pos, kv_heads, group, width).permute(0, 2, 3, 1, 4)
        fk = self.features(k, queries=False).transpose(1, 2)
        v = v.transpose(1, 2)
        if ctx.mask.key_valid is not None:
            fk = fk * ctx.mask.key_valid[:, None, -pos:, None].to(fk.dtype)
        past = ctx.past.get(self.layer)
        if past is None:
            state = LinearAttentionState(
                fk.new_zeros(batch, kv_heads, width, v.shape[-1]),
                fk.new_zeros(batch, kv_heads, width),
            )
        else:
            state = LinearAttentionState(*past)
        path = self.choose_path(ctx.backend)
        ctx.record_path(self.name, path)
        if path == RECURRENT:
            z, state = recurrent_form(fq, fk, v, state)
        else:
            z, state = self._explicit_form(fq, fk, v, state)
        if ctx.present is not None:
            ctx.present[self.layer] = state
        # [batch, kv_head, group, pos, d] -> [batch, pos, head, d]: head h reads kv head h // group
        return self.hook_z(z.permute(0, 3, 1, 2, 4).reshape(batch, pos, -1, z.shape[-1]))

    def _explicit_form(
        self, fq: Tensor, fk: Tensor, v: Tensor, state: LinearAttentionState
    ) -> tuple[Tensor, LinearAttentionState]:
        pos = fq.shape[3]
        causal = torch.ones(pos, pos, dtype=torch.bool, device=fq.device).tril()
        scores = torch.einsum("bkgqd,bksd->bkgqs", fq, fk) * causal
        batch, kv_heads, group = fq.shape[:3]
        scores = self.hook_attn_scores(scores.reshape(batch, kv_heads * group, pos, pos))
        scores = scores.view(batch, kv_heads, group, pos, pos)
        past_norm = torch.einsum("bkgqd,bkd->bkgq", fq, state.k_sum)
        norm = (scores.sum(-1) + past_norm).clamp_min(torch.finfo(fq.dtype).tiny)
        pattern = self.hook_pattern((scores / norm[..., None]).flatten(1, 2))
        pattern = pattern.view(batch, kv_heads, group, pos, pos)
        past_part = torch.einsum("bkgqd,bkde->bkgqe", fq, state.kv) / norm[..., None]
        z = torch.einsum("bkgqs,bkse->bkgqe", pattern, v) + past_part
        return z, _advanced(state, fk, v)


def _advanced(state: LinearAttentionState, fk: Tensor, v: Tensor) -> LinearAttentionState:
    """``state`` after the keys ``fk`` and values ``v`` (``[batch, kv_head, pos, d]``)."""
    return LinearAttentionState(
        state.kv + torch.einsum("bksd,bkse->bkde", fk, v), state.k_sum + fk.sum(2)
    )


def recurrent_form(
    fq: Float[Tensor, "batch kv_head group pos d_head"],
    fk: Float[Tensor, "batch kv_head pos d_head"],
    v: Float[Tensor, "batch kv_head pos d_value"],
    state: LinearAttentionState,
    chunk: int = CHUNK,
) -> tuple[Float[Tensor, "batch kv_head group pos d_value"], LinearAttentionState]:
    """Causal linear attention of featurised queries/keys after ``state``, chunk by chunk.

    Returns the mixed values and the state after the last position.
    """
    outputs = []
    tiny = torch.finfo(fq.dtype).tiny
    for start in range(0, fq.shape[3], chunk):
        q_c, k_c, v_c = (t[..., start : start + chunk, :] for t in (fq, fk, v))
        n = q_c.shape[3]
        causal = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril()
        scores = torch.einsum("bkgqd,bksd->bkgqs", q_c, k_c) * causal
        numerator = torch.einsum("bkgqs,bkse->bkgqe", scores, v_c)
        numerator = numerator + torch.einsum("bkgqd,bkde->bkgqe", q_c, state.kv)
        norm = scores.sum(-1) + torch.einsum("bkgqd,bkd->bkgq", q_c, state.k_sum)
        outputs.append(numerator / norm.clamp_min(tiny)[..., None])
        state = _advanced(state, k_c, v_c)
    return torch.cat(outputs, dim=3), state


class PerformerAttention(LinearAttention):
    """Performer's FAVOR+ (Choromanski et al. 2021): linear attention whose features
    approximate softmax attention, ``E[phi(q) . phi(k)] = exp(scale * q . k)``.

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = sqrt(attn_scale) x`` and
    ``W`` the ``m = cfg.performer_features`` rows of a fixed buffer ``W_features``:
    blocks of orthogonal directions with Gaussian-distributed norms, drawn per layer
    from ``cfg.performer_seed``. Queries subtract their largest exponent (it cancels
    between numerator and normaliser, so ``hook_attn_scores`` shows the kernel up to
    a factor per query; ``hook_pattern`` is exact); keys cannot, as their sums are
    carried as state. The approximation error shrinks as ``m`` grows (about
    ``1 / sqrt(m)``).
    """

    def __init__(self, cfg: Any, layer: int) -> None:
        super().__init__(cfg, layer)
        gen = torch.Generator().manual_seed(cfg.performer_seed * 1_000_003 + layer)
        self.W_features: Tensor
        self.register_buffer(
            "W_features", orthogonal_random_features(cfg.performer_features, cfg.d_head, gen)
        )

    def features(self, x: Tensor, queries: bool) -> Tensor:
        """FAVOR+ features ``[batch, pos, head, m]`` of queries or keys."""
        x = x * self.cfg.attn_scale**0.5
        exponent = x @ self.W_features.T.to(x.dtype) - x.pow(2).sum(-1, keepdim=True) / 2
        if queries:
            exponent = exponent - exponent.amax(-1, keepdim=True).detach()
        return exponent.exp() / self.W_features.shape[0] ** 0.5


def orthogonal_random_features(
    count: int, width: int, generator: torch.Generator
) -> Float[Tensor, "count width"]:
    """``count`` random directions in blocks of ``width`` orthogonal ones, each row's norm
    distributed as a standard Gaussian vector's (so each row alone is Gaussian)."""
    blocks = []
    for start in range(0, count, width):
        gaussian = torch.randn(width, width, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T[: min(width, count - start)])
    norms = torch.randn(count, width, generator=generator).norm(dim=1, keepdim=True)
    return torch.cat(blocks) * norms
