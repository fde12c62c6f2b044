"""A key-value cache for incremental decoding: past keys, values and padding, per layer."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.model.forward_context import PastKV
from mitk.shapes import Bool


class KVCache:
    """Keys and values of every position so far, one ``(k, v)`` per layer, and which are real.

    Pass it to ``model(tokens, past_kv_cache=cache)``: the forward attends to the
    cached positions, then appends the new ones (only once the forward has
    finished, so an error leaves the cache as it was). Each entry is ``[batch,
    kv_head, key_pos, d_head]``; on rotary models keys are stored after rotation.
    ``key_valid`` is ``[batch, key_pos]`` (True at real tokens), or None while
    nothing cached is padding.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers: list[PastKV | None] = [None] * n_layers
        self.key_valid: Bool[Tensor, "batch key_pos"] | None = None

    @property
    def length(self) -> int:
        """Number of positions cached (0 before the first forward)."""
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def past(self) -> dict[int, PastKV]:
        """The cached state per layer, for a ``ForwardContext``."""
        return {layer: kv for layer, kv in enumerate(self.layers) if kv is not None}

    def key_valid_with(
        self, new_valid: Bool[Tensor, "batch new"] | None, batch: int, new: int
    ) -> Bool[Tensor, "batch key_pos"] | None:
        """Real-token mask over cached and new positions (None: nothing is padding)."""
        first = self.layers[0]
        if first is not None and first[0].shape[0] != batch:
            raise ShapeMismatchError(
                f"the key-value cache holds a batch of {first[0].shape[0]}, the input has {batch}"
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

    def append(self, present: dict[int, PastKV], key_valid: Tensor | None) -> None:
        """Take the full (past + new) state each layer left in a finished forward."""
        for layer, kv in present.items():
            self.layers[layer] = kv
        self.key_valid = key_valid
