"""Sliding-window attention with global tokens, computed band by band (Longformer).

A local query ``i`` sees the keys ``j`` with ``|i - j| <= window`` plus every global
token; a global token's query sees every key. ``banded_attention`` cuts the queries
into chunks of ``c`` positions; chunk ``s`` reads only the ``c + 2 window`` keys around
it and the global tokens' keys, so memory grows as ``pos * (3 window + globals)``, never
``pos * pos``. ``global_rows`` attends from the global tokens alone. ``longformer_allowed``
is the same pattern as a dense boolean matrix, for the explicit path whose hooks show it.

Padded keys are never seen, except by a padded query, which sees itself (mitk's convention: no
softmax row is empty, and no real token reads a padded one's output).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Bool, Float, Int


class GlobalSlots(NamedTuple):
    """Where each batch row's global tokens are, packed into ``count`` slots."""

    position: Int[Tensor, "batch slot"]
    """Position of each slot's token, in order (slots past a row's own count repeat 0)."""
    valid: Bool[Tensor, "batch slot"]
    """True at slots holding a global token of that row."""
    slot_of: Int[Tensor, "batch pos"]
    """The slot of each global position (meaningless elsewhere)."""


def global_slots(global_tokens: Bool[Tensor, "batch pos"]) -> GlobalSlots:
    """Pack each row's global positions into as many slots as the row with the most has."""
    count = global_tokens.sum(-1)
    slots = int(count.max()) if global_tokens.numel() else 0
    # a stable sort of "not global" puts a row's global positions first, in order
    order = torch.argsort((~global_tokens).to(torch.int8), dim=-1, stable=True)
    valid = torch.arange(slots, device=order.device) < count[:, None]
    slot_of = (global_tokens.long().cumsum(-1) - 1).clamp(min=0)
    return GlobalSlots(order[:, :slots] * valid, valid, slot_of)


def _gather_pos(
    x: Float[Tensor, "batch head pos d"], index: Int[Tensor, "batch slot"]
) -> Float[Tensor, "batch head slot d"]:
    """``x`` at the given positions of each batch row."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def _key_windows(x: Tensor, window: int, chunk: int, n_pad: int) -> Tensor:
    """For each query chunk, the ``chunk + 2 window`` key slots around it.

    ``x`` is ``[batch, head, pos, d]``; the result is ``[batch, head, chunks, chunk +
    2 window, d]`` (slot ``t`` of chunk ``s`` is position ``s * chunk - window + t``;
    zeros outside the sequence).
    """
    padded = F.pad(x, (0, 0, window, n_pad - x.shape[2] + window))
    return padded.unfold(2, chunk + 2 * window, chunk).transpose(-1, -2)


def _mask_windows(x: Tensor, window: int, chunk: int, n_pad: int) -> Tensor:
    """``_key_windows`` of a ``[batch, pos]`` boolean: ``[batch, chunks, span]``, False outside."""
    padded = F.pad(x, (window, n_pad - x.shape[1] + window), value=False)
    return padded.unfold(1, chunk + 2 * window, chunk)


def _per_chunk(x: Tensor, chunks: int) -> Tensor:
    """``[batch, head, slot, d]`` repeated (as a view) for each chunk: ``[.., chunks, slot, d]``."""
    return x[:, :, None].expand(-1, -1, chunks, -1, -1)


def banded_attention(
    q: Float[Tensor, "batch head pos d_head"],
    k: Float[Tensor, "batch head pos d_head"],
    v: Float[Tensor, "batch head pos d_value"],
    window: int,
    band_keys: Bool[Tensor, "batch pos"],
    slots: GlobalSlots | None,
    scale: float,
) -> Float[Tensor, "batch head pos d_value"]:
    """Every query attending to its band of keys and to the global tokens' keys.

    ``band_keys`` marks the keys a query may see inside its band (real, not global:
    global keys come once, through their own columns, as ``slots`` lists them).
    Each chunk is one fused SDPA call's batch entry; the global rows' outputs are
    computed here like any other and replaced by the caller.
    """
    b, h, n, _ = q.shape
    chunk = min(window, n)
    chunks = -(-n // chunk)
    n_pad = chunks * chunk
    span = chunk + 2 * window
    qc = F.pad(q, (0, 0, 0, n_pad - n)).view(b, h, chunks, chunk, -1)
    kc = _key_windows(k, window, chunk, n_pad)
    vc = _key_windows(v, window, chunk, n_pad)
    ok = _mask_windows(band_keys, window, chunk, n_pad)
    # key slot - query offset = key - query + window: the band is [0, 2 window]
    offset = (
        torch.arange(span, device=q.device)[None] - torch.arange(chunk, device=q.device)[:, None]
    )
    band = (offset >= 0) & (offset <= 2 * window)
    allowed = band & (ok[:, :, None, :] | (offset == window))  # a query always sees itself
    if slots is not None and slots.position.shape[1]:
        g = slots.position.shape[1]
        # every chunk reads the same global keys and values
        kc = torch.cat([kc, _per_chunk(_gather_pos(k, slots.position), chunks)], 3)
        vc = torch.cat([vc, _per_chunk(_gather_pos(v, slots.position), chunks)], 3)
        seen = slots.valid[:, None, None, :].expand(b, chunks, chunk, g)
        allowed = torch.cat([allowed.expand(b, chunks, chunk, span), seen], -1)
    width = kc.shape[3]

    def by_chunk(x: Tensor) -> Tensor:  # [b, h, chunks, len, d] -> [b * chunks, h, len, d]
        return x.transpose(1, 2).reshape(b * chunks, h, x.shape[3], x.shape[4])

    z = F.scaled_dot_product_attention(
        by_chunk(qc),
        by_chunk(kc),
        by_chunk(vc),
        attn_mask=allowed.expand(b, chunks, chunk, width).reshape(b * chunks, 1, chunk, width),
        scale=scale,
    )
    return z.view(b, chunks, h, chunk, -1).transpose(1, 2).reshape(b, h, n_pad, -1)[:, :, :n]


def global_rows(
    q_global: Float[Tensor, "batch head pos d_head"],
    k_global: Float[Tensor, "batch head pos d_head"],
    v_global: Float[Tensor, "batch head pos d_value"],
    slots: GlobalSlots,
    key_valid: Bool[Tensor, "batch pos"] | None,
    scale: float,
) -> Float[Tensor, "batch head slot d_value"]:
    """Each global token's query attending to every real key, through the global projections."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(
        _gather_pos(q_global, slots.position), k_global, v_global, attn_mask=mask, scale=scale
    )


def with_global_rows(
    z: Float[Tensor, "batch head pos d_value"],
    z_global: Float[Tensor, "batch head slot d_value"],
    global_tokens: Bool[Tensor, "batch pos"],
    slots: GlobalSlots,
) -> Float[Tensor, "batch head pos d_value"]:
    """``z`` with each global position's row replaced by its global attention output."""
    b, h, n, d = z.shape
    at_pos = z_global.gather(2, slots.slot_of[:, None, :, None].expand(b, h, n, d))
    return torch.where(global_tokens[:, None, :, None], at_pos, z)


def longformer_allowed(
    n: int,
    window: int,
    key_valid: Bool[Tensor, "batch pos"] | None,
    global_tokens: Bool[Tensor, "batch pos"] | None,
    device: torch.device,
) -> Bool[Tensor, "batch_or_1 1 pos pos"]:
    """The pattern as a dense ``[q, k]`` matrix: the band and global columns, global rows full."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    valid = torch.ones(1, n, dtype=torch.bool, device=device) if key_valid is None else key_valid
    allowed = ((i - j).abs() <= window)[None] & valid[:, None, :]
    if global_tokens is not None:
        allowed = allowed | global_tokens[:, None, :]
        allowed = torch.where(global_tokens[:, :, None], valid[:, None, :], allowed)
    return (allowed | (i == j))[:, None]
