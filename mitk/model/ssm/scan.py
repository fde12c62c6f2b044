"""The selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t · h_t``.

Two forms of one recurrence:

- ``chunked_scan`` (the default path): positions in chunks; inside a chunk the
  states come from cumulative sums, all positions at once, and only the state
  at the chunk's end is carried to the next one. ``h_t = e^{S_t} (h_0 + Σ_{s≤t}
  e^{-S_s} u_s)`` with ``S_t`` the chunk's cumulative log-decay: ``e^{-S_s}`` grows
  with the chunk's total decay, so a chunk whose decay spans more than
  ``SPAN_LIMIT`` (in log space) is split in halves until it does not, down to
  single positions, which need no exponent at all. Memory is one chunk's
  ``[batch, chunk, d_inner, d_state]``, never the whole sequence's.
- ``sequential_scan``: one position at a time, every state kept; the path a
  mixer takes when a hook asks for the states or the per-position decays.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Float

CHUNK = 32
"""Positions per chunk of ``chunked_scan`` (before any split for a wide decay span)."""
SPAN_LIMIT = 30.0
"""Largest decay span (``-S`` at a chunk's end) computed in one piece: ``e^{30}`` is far from
fp32's overflow and its rounding stays near ``30 * eps`` relative."""


def chunked_scan(
    x: Float[Tensor, "batch pos d_inner"],
    dt: Float[Tensor, "batch pos d_inner"],
    A: Float[Tensor, "d_inner d_state"],
    B: Float[Tensor, "batch pos d_state"],
    C: Float[Tensor, "batch pos d_state"],
    state: Float[Tensor, "batch d_inner d_state"] | None,
    chunk: int = CHUNK,
) -> tuple[Float[Tensor, "batch pos d_inner"], Float[Tensor, "batch d_inner d_state"]]:
    """``y_t = C_t · h_t`` for every position, and the last state, chunk by chunk.

    The input ``u_t = dt_t B_t x_t`` and the log-decay ``dt_t A`` are built one
    chunk at a time. ``state`` is the state before the first position (None: zeros).
    """
    batch, pos, d_inner = x.shape
    h = x.new_zeros(batch, d_inner, A.shape[1]) if state is None else state.to(x.dtype)
    outputs = []
    for start in range(0, pos, chunk):
        stop = min(start + chunk, pos)
        dt_c = dt[:, start:stop]
        a = dt_c[..., None] * A  # [batch, T, d_inner, d_state], <= 0
        u = (dt_c * x[:, start:stop])[..., None] * B[:, start:stop, None, :]
        states = _chunk_states(a, u, h)
        outputs.append(torch.einsum("btcn,btn->btc", states, C[:, start:stop]))
        h = states[:, -1]
    y = torch.cat(outputs, dim=1) if outputs else x.new_zeros(batch, 0, d_inner)
    return y, h


def _chunk_states(
    a: Float[Tensor, "batch T d_inner d_state"],
    u: Float[Tensor, "batch T d_inner d_state"],
    h0: Float[Tensor, "batch d_inner d_state"],
) -> Float[Tensor, "batch T d_inner d_state"]:
    """Every state of one chunk from its log-decays ``a``, inputs ``u`` and entering state."""
    if a.shape[1] == 1:
        return a.exp() * h0[:, None] + u
    S = a.cumsum(1)
    if float(-S[:, -1].detach().min()) > SPAN_LIMIT:  # e^{-S} would overflow or lose precision
        half = a.shape[1] // 2
        first = _chunk_states(a[:, :half], u[:, :half], h0)
        return torch.cat([first, _chunk_states(a[:, half:], u[:, half:], first[:, -1])], dim=1)
    return S.exp() * ((-S).exp() * u).cumsum(1).add_(h0[:, None])


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
