"""Soft-capping (Gemma-2): a smooth clamp on attention scores and on logits."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Float


def soft_cap(x: Float[Tensor, "*shape"], cap: float) -> Float[Tensor, "*shape"]:
    """``cap * tanh(x / cap)``: ``x`` squashed smoothly into ``[-cap, cap]``.

    ``-inf`` becomes ``-cap``, so attention caps its scores before masking them.
    """
    return cap * torch.tanh(x / cap)
