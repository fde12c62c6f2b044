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
Decays below ``FLUSH_BELOW`` times the smallest normal float (~7.7e-34 in fp32) are set
to exactly 0: fast-decaying heads make many such entries, and subnormal numbers, or the
products of tiny decays with small inputs, run an order of magnitude slower on CPUs (the
scan took 2.4x as long on a random Mamba-2 model's inputs). A term so dropped is below
fp32's resolution of any output that is not itself ~1e-26 times its inputs' scale.
Positions past the end that fill the last chunk have ``dt = 0`` and no input, so the
state passes through them unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float

CHUNK = 64
"""Positions per chunk of ``ssd_scan``."""
FLUSH_BELOW = 2.0**16
"""Decays below this many times the smallest normal float (fp32's, or the input's if
wider; ~7.7e-34 in fp32) are set to 0 (see the module's numerics note)."""
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
    if len(outputs) == 1:
        return outputs[0], h
    y = torch.cat(outputs, dim=1) if outputs else x.new_zeros(batch, 0, heads, head_dim)
    return y, h


def segment_sums(a: Float[Tensor, "*lead L"]) -> Float[Tensor, "*lead L L"]:
    """``out[..., j, t] = a[j+1] + ... + a[t]`` for ``t >= j`` (0 on the diagonal), and 0
    for ``t < j`` (an empty segment: callers mask it). Each entry is summed over its own
    segment, so ``exp`` of it is the decay from just after ``j`` through ``t``."""
    L = a.shape[-1]
    after = torch.ones(L, L, dtype=torch.bool, device=a.device).triu(1)  # k > j
    # row j holds a[k] in the columns k > j; summing along the row gives a[j+1] + ... + a[t]
    return a[..., None, :].expand(*a.shape, L).masked_fill(~after, 0).cumsum(-1)


def _ssd_block(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """One block of ``ssd_scan``: its outputs ``[batch, P, heads, head_dim]`` and last state.

    Layouts are chosen so that the products read the inputs where they lie: ``x``, ``B``
    and ``C`` stay positions-major, states are held transposed, ``[d_state, width]`` per
    group (``width``: the group's heads' channels side by side), so the chunk states and
    their readout are each one product per chunk and group with no copy of their inputs;
    only step 1 reads a heads-major copy of ``dt x``. Without autograd, the chunk states
    are accumulated in place and the outputs written into one buffer.
    """
    batch, P, heads, head_dim = x.shape
    groups, d_state = B.shape[2:]
    per_group = heads // groups
    width = per_group * head_dim
    L = min(chunk, P)
    pad = -P % L
    if pad:  # dt = 0: no decay and no input, so the state passes the padding unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    K = (P + pad) // L
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, h))
    x_pm = x.reshape(batch, K, L, heads, head_dim)  # positions-major views
    dt_pm = dt.reshape(batch, K, L, heads)
    B_pm = B.reshape(batch, K, L, groups, d_state)
    C_g = C.reshape(batch, K, L, groups, d_state).transpose(2, 3)  # [batch, K, groups, L, n]
    dt_h = dt_pm.transpose(2, 3)  # [batch, K, heads, L]
    a = dt_h * A[:, None]
    seg = _flushed(segment_sums(a))  # [batch, K, heads, j, t]
    from_start = _flushed(a.cumsum(-1))  # seg(t, s-1): from the chunk's start through t

    # 1. within each chunk: y = W (dt x), W^T[j, t] = (B_j . C_t) e^seg(t, j) for t >= j
    # (dt_j moves from W onto x, which step 2 reads scaled too)
    to_end = seg[..., -1].exp()  # e^seg(end, j), for step 2 (before seg turns into W)
    BC = (B_pm.transpose(2, 3) @ C_g.transpose(-1, -2)).triu_()  # [batch, K, groups, j, t]
    if differentiable:
        xdt = (x_pm * dt_pm[..., None]).transpose(2, 3)
        WT = seg.exp().view(batch, K, groups, per_group, L, L) * BC[:, :, :, None]
    else:
        xdt = torch.empty(batch, K, heads, L, head_dim, dtype=x.dtype, device=x.device)
        torch.mul(x_pm.transpose(2, 3), dt_h[..., None], out=xdt)  # one heads-major copy
        WT = seg.exp_().view(batch, K, groups, per_group, L, L).mul_(BC[:, :, :, None])
    y_within = WT.view(batch, K, heads, L, L).transpose(-1, -2) @ xdt  # [.., heads, L, hd]

    # 2. each chunk's inputs decayed to its end: Z^T = B^T (x dt e^seg(end, j)), per group
    weighted = x_pm * (dt_pm * to_end.transpose(2, 3))[..., None]  # [batch, K, L, heads, hd]
    weighted = weighted.view(batch, K, L, groups, width).transpose(2, 3)
    B_T = B_pm.permute(0, 1, 3, 4, 2)  # [batch, K, groups, n, L]
    h_T = h.reshape(batch, groups, width, d_state).transpose(-1, -2)  # [batch, groups, n, width]

    # 3. across chunks: the state entering each chunk (slot k) and the last (slot K)
    decay = from_start[..., -1].exp()  # e^seg(end, s-1): [batch, K, heads]
    decay = decay.view(batch, K, groups, 1, per_group, 1).expand(-1, -1, -1, -1, -1, head_dim)
    decay = decay.reshape(batch, K, groups, 1, width)
    if differentiable:
        Z_T = B_T @ weighted
        states = [h_T]
        for k in range(K):
            states.append(torch.addcmul(Z_T[:, k], decay[:, k], states[-1]))
        entering, last_T = torch.stack(states[:-1], 1), states[-1]
    else:
        slots = torch.empty(batch, K + 1, groups, d_state, width, dtype=x.dtype, device=x.device)
        slots[:, 0] = h_T
        torch.matmul(B_T, weighted, out=slots[:, 1:])
        for k in range(K):
            slots[:, k + 1].addcmul_(decay[:, k], slots[:, k])
        entering, last_T = slots[:, :K], slots[:, K]
    last = last_T.transpose(-1, -2).reshape(batch, heads, head_dim, d_state)

    # 4. the entering state read out at each position, decayed from the chunk's start
    decay_in = from_start.exp().transpose(2, 3)[..., None]  # [batch, K, L, heads, 1]
    if differentiable:
        carried = (C_g @ entering).transpose(2, 3).reshape(batch, K, L, heads, head_dim)
        y = torch.addcmul(y_within.transpose(2, 3), carried, decay_in)
    else:
        y = torch.empty(batch, K, L, heads, head_dim, dtype=x.dtype, device=x.device)
        torch.matmul(C_g, entering, out=y.view(batch, K, L, groups, width).transpose(2, 3))
        y.mul_(decay_in).add_(y_within.transpose(2, 3))
    return y.reshape(batch, K * L, heads, head_dim)[:, :P], last


def _flushed(log_decay: Tensor) -> Tensor:
    """Log-decays below ``log(FLUSH_BELOW * tiny)`` set to ``-inf``: those decays become 0."""
    tiny = torch.finfo(torch.promote_types(log_decay.dtype, torch.float32)).tiny
    return log_decay.masked_fill(log_decay < math.log(tiny * FLUSH_BELOW), -torch.inf)
