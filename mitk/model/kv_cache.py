"""A key-value cache for incremental decoding: past keys, values and padding, per layer."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.model.forward_context import PastKV
from mitk.model.linear_attention import LinearAttentionState
from mitk.model.rwkv.state import RWKVState
from mitk.model.ssm.state import SSMState
from mitk.shapes import Bool, Float

RECURRENT_STATES = (SSMState, LinearAttentionState, RWKVState)
"""Layer states of constant size (no keys or values to list or to count positions by)."""


class KVCacheEntry(NamedTuple):
    """One layer's cached keys and values, in TransformerLens's ``[batch, pos, head, d_head]``.

    Views of the cached tensors (``head`` is the key-value head count on
    grouped-query models): an in-place edit changes what later forwards attend to.
    """

    past_keys: Float[Tensor, "batch pos kv_head d_head"]
    past_values: Float[Tensor, "batch pos kv_head d_head"]


class KVCache:
    """Keys and values of every position so far, one ``(k, v)`` per layer, and which are real.

    Pass it to ``model(tokens, past_kv_cache=cache)``: the forward attends to the
    cached positions, then appends the new ones (only once the forward has
    finished, so an error leaves the cache as it was). Each entry is ``[batch,
    kv_head, key_pos, d_head]``; on rotary models keys are stored after rotation.
    ``key_valid`` is ``[batch, key_pos]`` (True at real tokens), or None while
    nothing cached is padding.

    TransformerLens's spellings work too: ``KVCache.init_cache(cfg, device,
    batch_size)``, ``freeze()`` / ``unfreeze()`` (a frozen cache is read by each
    forward but never extended, so many continuations can share one prefix),
    ``frozen``, and ``entries`` / ``cache[layer]`` (views in TransformerLens's layout).
    """

    def __init__(self, n_layers: int, batch_size: int | None = None) -> None:
        self.layers: list[PastKV | None] = [None] * n_layers
        self.key_valid: Bool[Tensor, "batch key_pos"] | None = None
        self.batch_size = batch_size
        self.frozen = False
        self._length = 0

    @classmethod
    def init_cache(cls, cfg: Any, device: Any = None, batch_size: int = 1) -> KVCache:
        """An empty cache for a model with config ``cfg``, as TransformerLens builds one.

        ``device`` is accepted for TransformerLens's signature and not needed:
        tensors are created by the first forward, on the model's device. A forward
        with a batch other than ``batch_size`` raises ``ShapeMismatchError``.
        """
        return cls(cfg.n_layers, batch_size)

    def freeze(self) -> None:
        """Stop extending the cache: later forwards attend to it and leave it as it is."""
        self.frozen = True

    def unfreeze(self) -> None:
        """Extend the cache again with each forward's new positions."""
        self.frozen = False

    @property
    def length(self) -> int:
        """Number of positions cached (0 before the first forward)."""
        return self._length

    @property
    def entries(self) -> list[KVCacheEntry]:
        """Each cached layer's keys and values, ``[batch, pos, head, d_head]`` (none before one)."""
        return [
            KVCacheEntry(k.transpose(1, 2), v.transpose(1, 2))
            for k, v in (
                kv for kv in self.layers if kv is not None and not isinstance(kv, RECURRENT_STATES)
            )
        ]

    def __getitem__(self, layer: int) -> KVCacheEntry:
        """Layer ``layer``'s entry, as in ``entries``."""
        return self.entries[layer]

    def past(self) -> dict[int, PastKV]:
        """The cached state per layer, for a ``ForwardContext``."""
        return {layer: kv for layer, kv in enumerate(self.layers) if kv is not None}

    def key_valid_with(
        self, new_valid: Bool[Tensor, "batch new"] | None, batch: int, new: int
    ) -> Bool[Tensor, "batch key_pos"] | None:
        """Real-token mask over cached and new positions (None: nothing is padding)."""
        first = next((kv for kv in self.layers if kv is not None), None)
        held = first[0].shape[0] if first is not None else self.batch_size
        if held is not None and held != batch:
            raise ShapeMismatchError(
                f"the key-value cache holds a batch of {held}, the input has {batch}"
            )
        old = self.key_valid
        if old is None and new_valid is None:
            return None
        if old is None:
            assert new_valid is not None
            old = new_valid.new_ones(batch, self.length)
        if new_valid is None:
            new_valid = old.new_ones(batch, new)
        return torch.cat([old.to(new_valid.device), new_valid], dim=1)

    def append(
        self, present: dict[int, PastKV], key_valid: Tensor | None, length: int | None = None
    ) -> None:
        """Take the full (past + new) state each layer left in a finished forward, unless frozen.

        ``length`` is the number of positions seen so far (None: read from the keys);
        a recurrent layer's state (``RECURRENT_STATES``) is the same size at any length.
        """
        if self.frozen:
            return
        for layer, kv in present.items():
            self.layers[layer] = kv
        self.key_valid = key_valid
        if length is None:
            keyed = (kv for kv in present.values() if not isinstance(kv, RECURRENT_STATES))
            first = next(keyed, None)
            length = self._length if first is None else first[0].shape[2]
        self._length = length
