"""Mamba-2's scan in chunks, as matrix products: state-space duality (Dao & Gu, 2024).

Per head the decay is one scalar per position, ``a_t = dt_t A <= 0``, and the state is
a ``P x N`` matrix (``P`` channels of the head, ``N = d_state``)::

    H_t = e^{a_t} H_{t-1} + dt_t x_t B_t^T,        y_t = H_t C_t.

Write ``seg(t, j) = a_{j+1} + ... + a_t`` (the log-decay from just after ``j`` to ``t``;
``seg(t, t) = 0``). Unrolled from the state ``H_{s-1}`` entering a chunk that starts
at ``s``, for ``t`` in the chunk::

    H_t = e^{seg(t, s-1)} H_{s-1} + sum_{j=s..t} e^{seg(t, j)} dt_j x_j B_j^T
    y_t = e^{seg(t, s-1)} H_{s-1} C_t + sum_{j=s..t} [(C_t . B_j) e^{seg(t, j)} dt_j] x_j

so each chunk of ``L`` positions takes four products, none a loop over positions:

1. within the chunk, ``y = W X`` with ``W[t, j] = (C_t . B_j) e^{seg(t, j)} dt_j`` for
   ``j <= t`` and 0 above the diagonal: causal attention with a decay mask (``C . B``
   once per group, as the heads of a group share ``B`` and ``C``);
2. the chunk's own contribution to its last state, ``Z = sum_j e^{seg(end, j)} dt_j x_j
   B_j^T`` (a ``[P x L] [L x N]`` product per head);
3. across chunks, ``H_end = e^{seg(end, s-1)} H_{s-1} + Z``: a recurrence with one step
   per chunk, not per position;
4. the entering state read out at each position, ``e^{seg(t, s-1)} C_t^T H_{s-1}^T``.

A position costs ``L P`` (step 1) plus ``2 P N`` (steps 2 and 4) multiply-adds per head;
``CHUNK`` balances the first against the per-chunk overheads.

Numerics: every exponent is a sum of ``a_k <= 0`` over a segment, summed directly (a
cumulative sum of the masked ``[L, L]`` matrix of ``a``, or from the chunk's start), never
as the difference of two running sums (which cancels) nor as a ratio of exponentials
(which overflows): each factor lies in ``[0, 1]``, and underflow to 0 is the right limit.
Positions past the end that fill the last chunk have ``dt = 0`` and no input, so the
state passes through them unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float

CHUNK = 64
"""Positions per chunk of ``ssd_scan``."""
BLOCK_STATES = 2**23
"""State entries per batch row of the chunk states a block keeps (32 MiB in fp32): blocks
of chunks run one after the other, so memory does not grow with the sequence."""


def ssd_scan(
    x: Float[Tensor, "batch pos heads head_dim"],
    dt: Float[Tensor, "batch pos heads"],
    A: Float[Tensor, " heads"],
    B: Float[Tensor, "batch pos groups d_state"],
    C: Float[Tensor, "batch pos groups d_state"],
    state: Float[Tensor, "batch heads head_dim d_state"] | None,
    chunk: int = CHUNK,
    block: int | None = None,
) -> tuple[
    Float[Tensor, "batch pos heads head_dim"], Float[Tensor, "batch heads head_dim d_state"]
]:
    """``y_t = H_t C_t`` at every position, and the last state, without per-position states.

    Heads ``g * heads / groups`` to ``(g + 1) * heads / groups`` read group ``g``'s ``B``
    and ``C``. ``state`` is ``H`` before the first position (None: zeros). Blocks of
    ``block`` positions (None: as many chunks as ``BLOCK_STATES`` allows) run in turn,
    carrying the state.
    """
    batch, pos, heads, head_dim = x.shape
    d_state = B.shape[-1]
    if block is None:
        block = max(1, BLOCK_STATES // (heads * head_dim * d_state)) * chunk
    h = x.new_zeros(batch, heads, head_dim, d_state) if state is None else state.to(x.dtype)
    outputs = []
    for start in range(0, pos, block):
        part = slice(start, min(start + block, pos))
        y, h = _ssd_block(x[:, part], dt[:, part], A, B[:, part], C[:, part], h, chunk)
        outputs.append(y)
    y = torch.cat(outputs, dim=1) if outputs else x.new_zeros(batch, 0, heads, head_dim)
    return y, h


def segment_sums(a: Float[Tensor, "*lead L"]) -> Float[Tensor, "*lead L L"]:
    """``out[..., t, j] = a[j+1] + ... + a[t]`` for ``j <= t`` (0 on the diagonal), ``-inf``
    above it: each entry summed over its own segment, so ``exp`` of it is the decay."""
    L = a.shape[-1]
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    # column j holds a[k] in rows k > j; summing down the rows gives a[j+1] + ... + a[t]
    sums = a[..., :, None].expand(*a.shape, L).masked_fill(~ones.tril(-1), 0).cumsum(-2)
    return sums.masked_fill(~ones.tril(0), -torch.inf)


def _ssd_block(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """One block of ``ssd_scan``: its outputs ``[batch, P, heads, head_dim]`` and last state."""
    batch, P, heads, head_dim = x.shape
    groups, d_state = B.shape[2:]
    per_group = heads // groups
    L = min(chunk, P)
    pad = -P % L
    if pad:  # dt = 0: no decay and no input, so the state passes the padding unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    K = (P + pad) // L
    # positions-major [batch, K, L, ...] views of the inputs; heads-major copies where the
    # products need a head as a batch dimension
    dt_h = dt.reshape(batch, K, L, heads).transpose(2, 3)  # [batch, K, heads, L]
    a = dt_h * A[:, None]
    seg = segment_sums(a)  # [batch, K, heads, L, L]
    from_start = a.cumsum(-1)  # seg(t, s-1): from the chunk's start through t
    Bk = B.reshape(batch, K, L, groups, d_state).transpose(2, 3)  # [batch, K, groups, L, n]
    Ck = C.reshape(batch, K, L, groups, d_state).transpose(2, 3)
    xk = x.reshape(batch, K, L, heads, head_dim)

    # 1. within each chunk: W = (C B^T) * e^seg * dt_j, then W X, per head
    CB = Ck @ Bk.transpose(-1, -2)  # [batch, K, groups, L, L]
    to_end = seg[..., -1, :].exp()  # e^seg(end, j), for step 2
    W = seg.exp_().view(batch, K, groups, per_group, L, L) * CB[:, :, :, None]
    W = W * dt_h.view(batch, K, groups, per_group, 1, L)
    y = W.view(batch, K, heads, L, L) @ xk.transpose(2, 3)  # [batch, K, heads, L, head_dim]

    # 2. the chunk's inputs, decayed to its end: Z = (x * e^seg(end, j) dt_j)^T B, per group
    weighted = xk * (to_end * dt_h).transpose(2, 3)[..., None]  # [batch, K, L, heads, head_dim]
    weighted = weighted.view(batch, K, L, groups, per_group * head_dim).transpose(2, 3)
    Z = weighted.transpose(-1, -2) @ Bk  # [batch, K, groups, per_group * head_dim, n]
    Z = Z.view(batch, K, heads, head_dim, d_state)

    # 3. across chunks: the state entering each chunk, one step per chunk
    chunk_decay = from_start[..., -1].exp()  # [batch, K, heads]
    entering = []
    for k in range(K):
        entering.append(h)
        h = torch.addcmul(Z[:, k], chunk_decay[:, k, :, None, None], h)
    H0 = torch.stack(entering, 1).view(batch, K, groups, per_group * head_dim, d_state)

    # 4. the entering state read out at each position, decayed from the chunk's start
    carried = (Ck @ H0.transpose(-1, -2)).view(batch, K, groups, L, per_group, head_dim)
    carried = carried.permute(0, 1, 2, 4, 3, 5).reshape(batch, K, heads, L, head_dim)
    y = torch.addcmul(y, carried, from_start.exp()[..., None])
    y = y.transpose(2, 3).reshape(batch, K * L, heads, head_dim)
    return y[:, :P], h
