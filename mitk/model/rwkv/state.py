"""What an RWKV layer carries from one forward to the next: its last inputs and WKV state."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from mitk.shapes import Float


class RWKVState(NamedTuple):
    """One RWKV layer's state after the positions seen so far.

    It takes the place of a layer's keys and values in ``ForwardContext.past``/
    ``present`` and in a ``KVCache``: constant size, whatever the sequence length.
    """

    shift: Float[Tensor, "batch 2 d_model"]
    """The last normed inputs of time mixing (``[:, 0]``) and channel mixing (``[:, 1]``),
    which the next position's token shift reads (zeros before the first position)."""
    wkv: Float[Tensor, "batch d_attn 3"]
    """The WKV state ``(num, den, log_scale)`` after the last position, as in
    ``mixer.hook_wkv_state`` (float32 at least, whatever the model's dtype)."""
