"""BigBird's block-sparse attention as Hugging Face's ``BigBirdModel`` runs it in eval mode.

Positions fall in blocks of ``b`` (the last one may be partial; Hugging Face pads it with
masked tokens). Query blocks 0 and ``m - 1`` (of ``m``) are global and see every key;
query block ``i`` in between sees key blocks ``0, i - 1, i, i + 1, m - 1`` (the global
blocks and its window) and ``r`` random blocks, which Hugging Face's eval mode sets to
block 0 (``rand_attn`` is all zeros outside training). So the first block's keys enter
that softmax ``1 + r`` times: ``hook_attn_scores`` shows ``q . k`` scaled, plus
``log(1 + r)`` on those keys, ``-inf`` wherever no attention is computed, and
``hook_pattern`` its softmax, which sums to 1 over keys and has zeros off the pattern.
Sequences of ``(5 + 2r) b`` positions or fewer get full attention (Hugging Face switches
to ``original_full`` there, and keeps that switch for later calls; mitk decides per pass).

The blocked path (``"block_sparse: blocked"``) gathers each query block's five key blocks
and never builds a ``pos x pos`` matrix; the explicit one builds the scores and pattern
when a hook reads or holds them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.config import AttentionBackend, TransformerConfig
from mitk.config.block_sparse import BlockSparseConfig
from mitk.errors import UnsupportedModelError
from mitk.model.attention import Attention, eager_reason
from mitk.model.forward_context import ForwardContext
from mitk.shapes import Bool, Float

BLOCKED = "block_sparse: blocked"
WINDOW = 5
"""Key blocks a middle query block reads: the two global blocks and its three-block window."""

Heads = Float[Tensor, "batch head pos d_head"]


class BlockSparseAttention(Attention):
    """Bidirectional block-sparse attention with every hook of ``Attention`` (module doc)."""

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        assert cfg.block_sparse is not None
        self.sparse: BlockSparseConfig = cfg.block_sparse

    def choose_path(self, backend: AttentionBackend) -> str:
        """``"block_sparse: blocked"``, or ``"eager: <reason>"`` when a hook needs the pattern."""
        eager = eager_reason(backend, self.hook_attn_scores, self.hook_pattern)
        return eager if eager is not None else BLOCKED

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """``[batch, pos, head, d]`` in, ``hook_z`` out; full attention on short sequences."""
        if ctx.past.get(self.layer) is not None:
            raise UnsupportedModelError("block-sparse attention belongs to an encoder: no past")
        pos = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not self.sparse.is_sparse_at(pos):  # full attention, by the fused-attention rule
            path = Attention.choose_path(self, ctx.backend)
            ctx.record_path(self.name, path)
            z = self._fused(q, k, v, ctx) if path == "sdpa" else self._explicit(q, k, v, ctx)
            return self.hook_z(z.transpose(1, 2))
        path = self.choose_path(ctx.backend)
        ctx.record_path(self.name, path)
        valid = ctx.mask.key_valid
        if path == BLOCKED:
            z = self._blocked(q, k, v, valid)
        else:
            scores = q @ k.mT * self.cfg.attn_scale + self._multiplicity(pos, q.device).to(q.dtype)
            allowed = self._sparse_allowed(pos, valid, q.device)
            scores = self.hook_attn_scores(scores.masked_fill(~allowed, float("-inf")))
            z = self.hook_pattern(torch.softmax(scores, dim=-1)).to(v.dtype) @ v
        return self.hook_z(z.transpose(1, 2))

    # --- explicit: the dense pattern ---------------------------------------------------
    def _key_blocks(self, pos: int, device: torch.device) -> Bool[Tensor, "q k"]:
        """Where query position ``i`` reads key position ``j`` by the block structure alone."""
        size = self.sparse.block_size
        last = math.ceil(pos / size) - 1
        block = torch.arange(pos, device=device) // size
        qb, kb = block[:, None], block[None, :]
        global_row = (qb == 0) | (qb == last)
        return global_row | (kb == 0) | (kb == last) | ((qb - kb).abs() <= 1)

    def _multiplicity(self, pos: int, device: torch.device) -> Float[Tensor, "q k"]:
        """``log(1 + r)`` on block 0's keys for the middle query blocks (module docstring)."""
        size = self.sparse.block_size
        last = math.ceil(pos / size) - 1
        block = torch.arange(pos, device=device) // size
        middle = (block[:, None] != 0) & (block[:, None] != last)
        return (middle & (block[None, :] == 0)) * math.log1p(self.sparse.random_blocks)

    def _sparse_allowed(self, pos: int, valid: Tensor | None, device: torch.device) -> Tensor:
        allowed = self._key_blocks(pos, device)[None, None]
        if valid is None:
            return allowed
        # padded queries may see themselves, so no row is empty (its output is garbage)
        own = torch.eye(pos, dtype=torch.bool, device=device)
        return allowed & (valid.to(device).bool()[:, None, None, :] | own)

    # --- blocked: five key blocks per query block --------------------------------------
    def _blocked(self, q: Heads, k: Heads, v: Heads, valid: Tensor | None) -> Heads:
        """The block-sparse mix without a ``pos x pos`` matrix (padded to whole blocks)."""
        batch, _, pos, _ = q.shape
        size = self.sparse.block_size
        blocks = math.ceil(pos / size)
        pad = blocks * size - pos
        key_ok = torch.ones(batch, pos, dtype=torch.bool, device=q.device)
        if valid is not None:
            key_ok = valid.to(q.device).bool()
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        key_ok = F.pad(key_ok, (0, pad), value=False)
        slots = torch.arange(blocks * size, device=q.device)
        scale = self.cfg.attn_scale
        # global query blocks: every key (padded queries may see themselves: no empty row)
        rows = torch.cat([slots[:size], slots[-size:]])
        own = rows[:, None] == slots[None, :]
        scores = q[:, :, rows] @ k.mT * scale
        scores = scores.masked_fill(~(key_ok[:, None, None, :] | own), float("-inf"))
        z_global = torch.softmax(scores, dim=-1) @ v
        # middle query blocks: key blocks 0, i-1, i, i+1, last (a repeat of 0 or last masked)
        index = middle_key_blocks(blocks, q.device)  # [blocks - 2, WINDOW]
        k_mid = k.unflatten(2, (blocks, size))[:, :, index].flatten(3, 4)
        v_mid = v.unflatten(2, (blocks, size))[:, :, index].flatten(3, 4)
        q_mid = q.unflatten(2, (blocks, size))[:, :, 1:-1]
        scores = q_mid @ k_mid.mT * scale  # [batch, head, blocks - 2, size, WINDOW * size]
        first = torch.zeros(WINDOW, device=q.device)
        first[0] = math.log1p(self.sparse.random_blocks)
        scores = scores + first.repeat_interleave(size).to(scores.dtype)
        key_pos = slots.view(blocks, size)[index].flatten(1)  # [blocks - 2, WINDOW * size]
        query_pos = slots.view(blocks, size)[1:-1]
        repeat = torch.zeros(blocks - 2, WINDOW, dtype=torch.bool, device=q.device)
        repeat[0, 1] = repeat[-1, 3] = True  # block 1's i-1 is block 0; block m-2's i+1 is m-1
        ok = key_ok[:, key_pos][:, :, None, :] | (key_pos[:, None, :] == query_pos[:, :, None])
        ok = ok & ~repeat.repeat_interleave(size, dim=1)[None, :, None, :]
        scores = scores.masked_fill(~ok[:, None], float("-inf"))
        z_mid = torch.softmax(scores, dim=-1) @ v_mid
        z = torch.cat([z_global[:, :, :size], z_mid.flatten(2, 3), z_global[:, :, size:]], dim=2)
        return z[:, :, :pos]


def middle_key_blocks(blocks: int, device: torch.device) -> Tensor:
    """``[blocks - 2, 5]``: key blocks ``0, i - 1, i, i + 1, blocks - 1`` of query block ``i``."""
    i = torch.arange(1, blocks - 1, device=device)[:, None]
    return torch.cat([torch.zeros_like(i), i - 1, i, i + 1, torch.full_like(i, blocks - 1)], 1)
