"""RWKV-4's WKV recurrence: a decaying, key-weighted average of the values seen so far.

With ``w = exp(time_decay) > 0`` and ``u = time_first`` (per channel), position ``t`` reads

    wkv_t = (a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t}),
    a_t = e^{-w} a_{t-1} + e^{k_t} v_t,   b_t = e^{-w} b_{t-1} + e^{k_t}.

``a`` and ``b`` overflow for large keys or long sequences, so a state is held as
``(num, den, log_scale)`` with ``a = num e^{log_scale}``, ``b = den e^{log_scale}``, and
every combination of states rescales them to the largest ``log_scale`` first (the
running maximum of RWKV's reference code): only exponents ``<= 0`` are ever taken.

Both entry points work in chunks. A block of positions is cut into ``K`` chunks of ``T``
(about ``sqrt(block)`` each); the chunks advance side by side from an empty state
(``T`` steps, each one operation over all chunks), then ``K`` small steps carry the
state across chunk boundaries, and each position combines its chunk-local state with
the carried one decayed to it. Blocks run one after the other, small enough that their
tensors stay in cache. ``chunked_wkv`` returns the outputs and the last state only;
``wkv_states`` every position's state (what ``hook_wkv_state`` shows), read out by
``wkv_readout``. Exact up to rounding.
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
BLOCK_ELEMENTS = 256 * 768
"""Entries (batch x positions x channels) of one block of ``chunked_wkv``: a few tensors fit
a CPU's cache (256 positions of a 768-channel layer, one sequence)."""


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


class _Chunks(NamedTuple):
    """One block cut into ``K`` chunks of ``T``, ``[batch, T, K, c]`` (``entering``: ``[batch,
    1, K, c]``), after both passes."""

    k: Tensor
    v: Tensor
    local: WKVStates
    """Each chunk's own state (from empty) before or after each of its positions."""
    entering: WKVStates
    """The state entering each chunk from everything before it."""
    last: WKVStates
    """The state after the block's last real position, ``[batch, c]``."""


def _chunked(
    k: Tensor, v: Tensor, w: Tensor, state: WKVStates, chunk: int | None, before: bool
) -> _Chunks:
    """Both passes over one block (see the module docstring)."""
    pos = k.shape[1]
    T = min(pos, chunk or max(1, math.isqrt(pos)))
    pad = -pos % T  # keys EMPTY, values 0: padded positions only decay the state
    if pad:
        k = F.pad(k, (0, 0, 0, pad), value=EMPTY)
        v = F.pad(v, (0, 0, 0, pad))
    K = (pos + pad) // T
    ks, vs = (t.unflatten(1, (K, T)).transpose(1, 2) for t in (k, v))  # [batch, T, K, c]
    # each chunk from empty, all chunks at once
    current = WKVStates(vs[:, 0], torch.ones_like(vs[:, 0]), ks[:, 0])
    local = [empty_state(ks[:, 0]), current] if before else [current]
    for t in range(1, T):
        new = WKVStates(vs[:, t], torch.ones_like(vs[:, t]), ks[:, t])
        current = merge(decayed(current, -w), new)
        local.append(current)
    entering, carried = [], state
    for c in range(K):
        entering.append(carried)
        carried = merge(decayed(carried, -T * w), WKVStates(*(part[:, c] for part in current)))
    stacked = local[:T]  # before: the T states before each position; after: all T
    return _Chunks(
        ks,
        vs,
        WKVStates(*(torch.stack(parts, 1) for parts in zip(*stacked, strict=True))),
        WKVStates(*(torch.stack(parts, 1)[:, None] for parts in zip(*entering, strict=True))),
        decayed(carried, pad * w),  # undo the padded positions' decay
    )


def _steps(T: int, w: Tensor, first: int) -> Tensor:
    """``-(first + t) w`` for ``t < T``, ``[1, T, 1, c]``: the decay from a chunk's start."""
    return -torch.arange(first, first + T, dtype=w.dtype, device=w.device)[None, :, None, None] * w


def _blocks(batch: int, pos: int, width: int) -> list[slice]:
    size = max(1, BLOCK_ELEMENTS // max(batch * width, 1))
    return [slice(start, min(start + size, pos)) for start in range(0, pos, size)]


def chunked_wkv(
    k: Float[Tensor, "batch pos d_attn"],
    v: Float[Tensor, "batch pos d_attn"],
    w: Float[Tensor, " d_attn"],
    u: Float[Tensor, " d_attn"],
    state: WKVStates | None = None,
    chunk: int | None = None,
) -> tuple[Float[Tensor, "batch pos d_attn"], WKVStates]:
    """Every position's ``wkv_t``, and the state after the last position (``[batch, d_attn]``).

    ``w`` is the per-step decay rate ``exp(time_decay)``, ``u`` the current position's
    bonus ``time_first``; ``state`` the state before the first position (None: empty);
    ``chunk`` the positions per chunk (None: about ``sqrt(block)``). Keys of ``EMPTY``
    add nothing.
    """
    batch, pos, width = k.shape
    state = empty_state(k[:, 0]) if state is None else state
    out = torch.empty_like(v)
    for part in _blocks(batch, pos, width):
        chunks = _chunked(k[:, part], v[:, part], w, state, chunk, before=True)
        T = chunks.k.shape[1]
        carried = decayed(chunks.entering, _steps(T, w, 0))
        local, bonus = chunks.local, u + chunks.k
        scale = torch.maximum(torch.maximum(carried.log_scale, local.log_scale), bonus)
        e_carried = (carried.log_scale - scale).exp_()
        e_local = (local.log_scale - scale).exp_()
        e_bonus = (bonus - scale).exp_()
        num = e_carried * carried.num + e_local * local.num + e_bonus * chunks.v
        den = e_carried * carried.den + e_local * local.den + e_bonus
        y = (num / den).transpose(1, 2).flatten(1, 2)  # [batch, K * T, c]
        out[:, part] = y[:, : part.stop - part.start]
        state = chunks.last
    return out, state


def wkv_states(
    k: Float[Tensor, "batch pos d_attn"],
    v: Float[Tensor, "batch pos d_attn"],
    w: Float[Tensor, " d_attn"],
    state: WKVStates | None = None,
    chunk: int | None = None,
) -> WKVStates:
    """The state after each position, each part ``[batch, pos, d_attn]`` (see ``chunked_wkv``)."""
    batch, pos, width = k.shape
    state = empty_state(k[:, 0]) if state is None else state
    parts = []
    for part in _blocks(batch, pos, width):
        chunks = _chunked(k[:, part], v[:, part], w, state, chunk, before=False)
        T = chunks.k.shape[1]
        after = merge(decayed(chunks.entering, _steps(T, w, 1)), chunks.local)
        length = part.stop - part.start
        parts.append(WKVStates(*(t.transpose(1, 2).flatten(1, 2)[:, :length] for t in after)))
        state = chunks.last
    if not parts:
        return WKVStates(*(t.new_zeros(batch, 0, width) for t in state))
    return WKVStates(*(torch.cat(pieces, 1) for pieces in zip(*parts, strict=True)))


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
