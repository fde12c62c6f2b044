"""The selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t · h_t``.

Two forms of one recurrence:

- ``chunked_scan`` (the default path): a block of positions is cut into ``K`` chunks
  of ``T``; the recurrence advances all chunks together, one position of each per
  step (``T`` steps, each one operation over ``K`` chunks), from a zero state, then
  ``K`` small steps carry the state across chunk boundaries. About ``2 sqrt(block)``
  steps per block instead of one per position, and exact: only decays ``<= 1`` are
  multiplied. Memory is a block's ``[batch, block, d_inner, d_state]`` tensors, never
  the whole sequence's.
- ``sequential_scan``: one position at a time, every state kept; the path a
  mixer takes when a hook asks for the states or the per-position decays.
"""

from __future__ import annotations

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float

CHUNK = 16
"""Positions per chunk of ``chunked_scan``."""
BLOCK_ELEMENTS = 256 * 1536 * 16
"""State entries per batch row of a block of positions whose chunks ``chunked_scan`` computes
together (256 positions of mamba-130m's layers): memory is a block's few
``[batch, block, d_inner, d_state]`` tensors, never the whole sequence's."""


def chunked_scan(
    x: Float[Tensor, "batch pos d_inner"],
    dt: Float[Tensor, "batch pos d_inner"],
    A: Float[Tensor, "d_inner d_state"],
    B: Float[Tensor, "batch pos d_state"],
    C: Float[Tensor, "batch pos d_state"],
    state: Float[Tensor, "batch d_inner d_state"] | None,
    chunk: int = CHUNK,
    block: int | None = None,
) -> tuple[Float[Tensor, "batch pos d_inner"], Float[Tensor, "batch d_inner d_state"]]:
    """``y_t = C_t · h_t`` for every position, and the last state.

    Blocks of ``block`` positions (None: as many chunks as ``BLOCK_ELEMENTS`` state
    entries allow) run one after the other (``_scan_block``). ``state`` is the state
    before the first position (None: zeros).
    """
    batch, pos, d_inner = x.shape
    if block is None:
        block = max(1, BLOCK_ELEMENTS // (d_inner * A.shape[1] * chunk)) * chunk
    h = x.new_zeros(batch, d_inner, A.shape[1]) if state is None else state.to(x.dtype)
    outputs = []
    for start in range(0, pos, block):
        part = slice(start, min(start + block, pos))
        y, h = _scan_block(x[:, part], dt[:, part], A, B[:, part], C[:, part], h, chunk)
        outputs.append(y)
    y = torch.cat(outputs, dim=1) if outputs else x.new_zeros(batch, 0, d_inner)
    return y, h


def _scan_block(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """One block of ``chunked_scan``: its outputs ``[batch, P, d_inner]`` and last state.

    The block's ``K`` chunks of ``T`` positions run side by side: step ``t`` advances
    every chunk's state (from zero) by one position, all chunks in one operation, so
    ``T`` steps cover the block. Then ``K`` small steps carry the state across the
    chunk boundaries, and each state gets the carried state's share, decayed to its
    position (``e^{S}``, ``S`` the log-decay summed from the chunk's start). Only
    decays (``<= 1``) are ever multiplied: nothing overflows, however fast a channel
    decays. Without autograd the states are built in place, over the inputs.
    """
    batch, P, d_inner = x.shape
    T = min(chunk, P)
    pad = -P % T  # padded positions: dt = 0 (no decay) and no input, so h passes unchanged
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, dt, B, C))
    K = (P + pad) // T

    def by_step(t: Tensor) -> Tensor:  # [batch, K * T, ...] -> [batch, T, K, ...]
        return t.unflatten(1, (K, T)).transpose(1, 2)

    dt_steps = by_step(dt)  # [batch, T, K, d_inner]
    step_decay = (dt_steps[..., None] * A).exp_()  # [batch, T, K, d_inner, d_state]
    u = by_step(dt * x)[..., None] * by_step(B)[..., None, :]
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, h))
    if differentiable:  # autograd keeps every step: a new tensor per step
        # unbind, not u[:, t]: each indexing's backward would write a zero tensor the size
        # of the whole block, T of them (quadratic); unbind's backward is one stack
        inputs, decays = u.unbind(1), step_decay.unbind(1)
        steps = [inputs[0]]
        for t in range(1, T):
            steps.append(torch.addcmul(inputs[t], decays[t], steps[-1]))
        local = torch.stack(steps, 1)
        decay = (dt_steps.cumsum(1)[..., None] * A).exp_()  # from each chunk's start
    else:  # states and cumulative decays overwrite the inputs they are built from
        local, decay = u, step_decay
        for t in range(1, T):
            local[:, t].addcmul_(step_decay[:, t], local[:, t - 1])
            decay[:, t].mul_(decay[:, t - 1])
    entering = []
    chunk_ends, chunk_decays = local[:, -1].unbind(1), decay[:, -1].unbind(1)
    for k in range(K):
        entering.append(h)
        h = torch.addcmul(chunk_ends[k], chunk_decays[k], h)
    carried = torch.stack(entering, 1)[:, None]  # [batch, 1, K, d_inner, d_state]
    states = (
        torch.addcmul(local, decay, carried) if differentiable else local.addcmul_(decay, carried)
    )
    y = torch.einsum("btkcn,btkn->bktc", states, by_step(C))
    return y.reshape(batch, K * T, d_inner)[:, :P], h


def sequential_scan(
    decay: Float[Tensor, "batch pos d_inner d_state"],
    u: Float[Tensor, "batch pos d_inner d_state"],
    state: Float[Tensor, "batch d_inner d_state"] | None,
) -> Float[Tensor, "batch pos d_inner d_state"]:
    """Every state ``h_t = decay_t * h_{t-1} + u_t``, one position at a time (``state``: h_{-1})."""
    h = u.new_zeros(u.shape[0], *u.shape[2:]) if state is None else state.to(u.dtype)
    states = torch.empty_like(u)
    for t in range(u.shape[1]):
        h = decay[:, t] * h + u[:, t]
        states[:, t] = h
    return states
