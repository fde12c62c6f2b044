"""The state of one pass through the blocks, in one object.

Every forward (a plain call, caching, generation with a key-value cache, the
patching engine's partial runs, both T5 stacks) builds a ``ForwardContext`` and
hands it to each block, which hands it to its attention. Modules read the
mask, the backend and any past keys/values from it and record into it what
they did (the attention path taken, the full keys/values when a cache asks for
them); nothing is ever written onto a module during a forward, so two forwards
can never see each other's state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mitk.config import AttentionBackend
from mitk.model.masks import AttentionMask

# keys and values of earlier positions, in the compute layout [batch, kv_head, past_pos, d_head]
PastKV = tuple[Tensor, Tensor]


@dataclass
class ForwardContext:
    """Everything one pass through the blocks needs, and what it records.

    - ``mask``: key visibility and positions (``q_len`` new positions after
      ``k_len - q_len`` past ones).
    - ``backend``: ``"auto"`` (fused unless a hook needs scores or patterns),
      ``"sdpa"`` or ``"eager"``.
    - ``start``/``stop``: the block range ``run_blocks`` runs (``stop`` None: to the end).
    - ``past``: per layer, state of earlier positions (keys and values,
      ``[batch, kv_head, past_pos, d_head]``); layers absent from it start fresh.
    - ``present``: None, or a dict each layer fills with its full (past + new)
      state, for a key-value cache to keep.
    - ``held``: hook name -> value that replaces the computed activation
      (attention patterns, norm scales) for the whole pass; a held pattern
      forces that layer's explicit path, like a hook on it.
    - ``cross``/``cross_valid``: the encoder output cross-attention reads and
      its ``[batch, enc_pos]`` real-token mask (None: nothing padded).
    - ``global_tokens``: ``[batch, pos]``, True at tokens with global attention
      (Longformer's ``global_attention_mask``); None: none.
    - ``paths``: filled during the pass: attention module name -> ``"sdpa"`` or
      ``"eager: <why>"``.
    - ``memo``: tensors every layer would otherwise rebuild (rotary angles,
      the ALiBi or T5 score bias), built once per pass by ``shared``.
    """

    mask: AttentionMask
    backend: AttentionBackend = "auto"
    start: int = 0
    stop: int | None = None
    past: Mapping[int, PastKV] = field(default_factory=dict)
    present: dict[int, PastKV] | None = None
    held: Mapping[str, Tensor] = field(default_factory=dict)
    cross: Tensor | None = None
    cross_valid: Tensor | None = None
    global_tokens: Tensor | None = None
    paths: dict[str, str] = field(default_factory=dict)
    memo: dict[str, Tensor | None] = field(default_factory=dict, repr=False)

    def shared(self, key: str, build: Callable[[], Tensor | None]) -> Tensor | None:
        """``build()`` on first use in this pass, the same tensor for every later layer."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def with_past(self, layer: int, keys: Tensor, values: Tensor) -> PastKV:
        """This layer's keys and values with any past ones in front; kept if ``present`` asks."""
        past = self.past.get(layer)
        if past is not None:
            keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
        if self.present is not None:
            self.present[layer] = (keys, values)
        return keys, values

    def record_path(self, attention_name: str, path: str) -> None:
        """Note which path an attention module took in this pass."""
        self.paths[attention_name] = path
