"""Which keys each query may attend to (causality, padding, a sliding window), and positions.

Built once per forward and shared by every layer. The fused kernel gets
``is_causal=True`` and no mask tensor whenever that says the same thing (no
padding, no window), which keeps the fastest kernels eligible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AttentionMask:
    """Key visibility for one forward.

    ``key_valid`` is ``[batch, key_pos]`` (True at real tokens) or None when
    nothing is padded. Queries at padded positions are allowed to see
    themselves, so no softmax row is empty (their outputs are garbage that no
    real token ever reads).
    """

    causal: bool
    q_len: int
    k_len: int
    key_valid: Tensor | None = None
    _dense: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _positions: Tensor | None = field(default=None, repr=False)
    memo: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """Per-forward tensors every layer would otherwise rebuild (e.g. the ALiBi bias)."""

    @property
    def is_plain_causal(self) -> bool:
        """True when the mask is exactly lower-triangular (SDPA's ``is_causal``)."""
        return self.causal and self.key_valid is None and self.q_len == self.k_len

    @property
    def is_full(self) -> bool:
        """True when every query sees every key (bidirectional, no padding)."""
        return not self.causal and self.key_valid is None

    def restricts(self, window: int = 0) -> bool:
        """True unless every query sees every key (bidirectional, no padding, no active window)."""
        return not self.is_full or self.window_applies(window)

    def window_applies(self, window: int) -> bool:
        """True when a sliding window of ``window`` positions hides some key (0: no window)."""
        return 0 < window < self.k_len

    def dense(self, device: torch.device, window: int = 0) -> Tensor:
        """Boolean ``[batch or 1, 1, q, k]``: True where attention is allowed.

        ``window > 0`` also hides keys ``window`` or more positions before the
        query (counted in sequence slots, as Hugging Face does).
        """
        if window not in self._dense:
            offset = self.k_len - self.q_len  # queries are the last q_len positions
            q_idx = torch.arange(self.q_len, device=device)[:, None] + offset
            k_idx = torch.arange(self.k_len, device=device)[None, :]
            allowed = (k_idx <= q_idx) if self.causal else torch.ones_like(k_idx <= q_idx)
            if self.window_applies(window):
                allowed = allowed & (q_idx - k_idx < window)
            allowed = allowed[None, None]
            if self.key_valid is not None:
                kv = self.key_valid.to(device).bool()[:, None, None, :]
                allowed = allowed & (kv | (k_idx == q_idx)[None, None])
            self._dense[window] = allowed
        return self._dense[window]

    def positions(self, device: torch.device) -> Tensor:
        """Position id of every key slot, ``[batch or 1, k_len]``; queries are the last ``q_len``.

        Counted over real tokens only (see ``position_ids_from_mask``), so a
        left-padded row gets the positions it would have alone.
        """
        if self._positions is None:
            key_valid = None if self.key_valid is None else self.key_valid.to(device)
            self._positions = position_ids_from_mask(key_valid, self.k_len, device)
        return self._positions


def position_ids_from_mask(
    attention_mask: Tensor | None, seq_len: int, device: torch.device
) -> Tensor:
    """Position of each token counting real tokens only, so left padding does not shift positions.

    Returns ``[batch or 1, pos]``; padded slots get position 0.
    """
    if attention_mask is None:
        return torch.arange(seq_len, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
