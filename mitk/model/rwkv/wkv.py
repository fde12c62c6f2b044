"""RWKV-4's WKV recurrence: a decaying, key-weighted average of the values seen so far.

With ``w = exp(time_decay) > 0`` and ``u = time_first`` (per channel), position ``t`` reads

    wkv_t = (a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t}),
    a_t = e^{-w} a_{t-1} + e^{k_t} v_t,   b_t = e^{-w} b_{t-1} + e^{k_t}.

``a`` and ``b`` overflow for large keys or long sequences, so a state is held as
``(num, den, log_scale)`` with ``a = num e^{log_scale}``, ``b = den e^{log_scale}``, and
every combination of two states rescales both to the larger ``log_scale`` first (the
running maximum of RWKV's reference code): only exponents ``<= 0`` are ever taken.

``wkv_states`` gives the state after every position in chunks: ``K`` chunks of ``T``
positions advance side by side from an empty state (``T`` steps, each one operation
over all chunks), then ``K`` small steps carry the state across chunk boundaries, and
each position's state is its chunk-local state merged with the carried one decayed to
it. About ``2 sqrt(pos)`` Python-level steps instead of one per position, exact up to
rounding, and memory of a few ``[batch, pos, d_attn]`` tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float

EMPTY = -1e38
"""``log_scale`` of an empty state (and the key of a padded position): ``e^{EMPTY - x}``
is 0 for any real ``x``, yet differences of two such values stay finite (no NaN)."""


class WKVStates(NamedTuple):
    """States ``(num, den, log_scale)``, each ``[..., d_attn]``: ``a = num e^{log_scale}``."""

    num: Tensor
    den: Tensor
    log_scale: Tensor


def empty_state(like: Float[Tensor, "*lead d_attn"]) -> WKVStates:
    """The state before any position: nothing accumulated."""
    zeros = torch.zeros_like(like)
    return WKVStates(zeros, zeros, torch.full_like(like, EMPTY))


def merge(first: WKVStates, second: WKVStates) -> WKVStates:
    """The state holding both sums (``a_1 + a_2``, ``b_1 + b_2``), rescaled to the larger scale."""
    scale = torch.maximum(first.log_scale, second.log_scale)
    e1, e2 = (first.log_scale - scale).exp(), (second.log_scale - scale).exp()
    return WKVStates(e1 * first.num + e2 * second.num, e1 * first.den + e2 * second.den, scale)


def decayed(state: WKVStates, log_decay: Tensor) -> WKVStates:
    """``state`` multiplied by ``e^{log_decay}`` (``-steps * w``): only its scale moves."""
    return WKVStates(state.num, state.den, state.log_scale + log_decay)


def wkv_states(
    k: Float[Tensor, "batch pos d_attn"],
    v: Float[Tensor, "batch pos d_attn"],
    w: Float[Tensor, " d_attn"],
    state: WKVStates | None = None,
    chunk: int | None = None,
) -> WKVStates:
    """The state after each position, each part ``[batch, pos, d_attn]``.

    ``w`` is the per-step decay rate ``exp(time_decay)``; ``state`` the state before the
    first position (None: empty); ``chunk`` the positions per chunk (None: about
    ``sqrt(pos)``, which balances the two loops). Keys of ``EMPTY`` add nothing.
    """
    batch, pos, width = k.shape
    if state is None:
        state = empty_state(k[:, 0])
    if pos == 0:
        return WKVStates(*(t.new_zeros(batch, 0, width) for t in state))
    T = min(pos, chunk or max(1, math.isqrt(pos)))
    pad = -pos % T  # keys EMPTY, values 0: padded positions only decay the state
    if pad:
        k = F.pad(k, (0, 0, 0, pad), value=EMPTY)
        v = F.pad(v, (0, 0, 0, pad))
    K = (pos + pad) // T

    def by_step(t: Tensor) -> Tensor:  # [batch, K * T, c] -> [batch, T, K, c]
        return t.unflatten(1, (K, T)).transpose(1, 2)

    ks, vs = by_step(k), by_step(v)
    # each chunk from empty, all chunks at once: state after its first t + 1 positions
    local = [WKVStates(vs[:, 0], torch.ones_like(vs[:, 0]), ks[:, 0])]
    for t in range(1, T):
        new = WKVStates(vs[:, t], torch.ones_like(vs[:, t]), ks[:, t])
        local.append(merge(decayed(local[-1], -w), new))
    chunk_ends = local[-1]  # [batch, K, c]
    entering, carried = [], state
    for c in range(K):  # the state entering each chunk
        entering.append(carried)
        carried = merge(decayed(carried, -T * w), WKVStates(*(part[:, c] for part in chunk_ends)))
    into = WKVStates(*(torch.stack(parts, 1)[:, None] for parts in zip(*entering, strict=True)))
    steps = torch.arange(1, T + 1, dtype=w.dtype, device=w.device)[None, :, None, None]
    chunk_local = WKVStates(*(torch.stack(parts, 1) for parts in zip(*local, strict=True)))
    after = merge(decayed(into, -steps * w), chunk_local)  # [batch, T, K, c]
    return WKVStates(*(part.transpose(1, 2).flatten(1, 2)[:, :pos] for part in after))


def shifted_states(after: WKVStates, state: WKVStates | None) -> WKVStates:
    """The state before each position: ``state`` (None: empty) at 0, ``after[t - 1]`` at ``t``."""
    first = empty_state(after.num[:, 0]) if state is None else state
    return WKVStates(*(
        torch.cat([start[:, None].to(part.dtype), part[:, :-1]], 1)
        for start, part in zip(first, after, strict=True)
    ))  # fmt: skip


def wkv_readout(
    before: WKVStates,
    k: Float[Tensor, "batch pos d_attn"],
    v: Float[Tensor, "batch pos d_attn"],
    u: Float[Tensor, " d_attn"],
) -> Float[Tensor, "batch pos d_attn"]:
    """``wkv_t``: the state before ``t`` merged with the current value's bonus ``e^{u + k_t}``."""
    bonus = u + k
    scale = torch.maximum(before.log_scale, bonus)
    e1, e2 = (before.log_scale - scale).exp(), (bonus - scale).exp()
    return (e1 * before.num + e2 * v) / (e1 * before.den + e2)
