"""RWKV's token shift: each position blends its input with the previous position's."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Float


def token_shift(
    x: Float[Tensor, "batch pos d_model"], last: Float[Tensor, "batch d_model"] | None
) -> Float[Tensor, "batch pos d_model"]:
    """The previous position's input at every position: ``last`` (None: zeros) at the first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def blend(
    x: Float[Tensor, "batch pos d_model"],
    shifted: Float[Tensor, "batch pos d_model"],
    mix: Float[Tensor, " d_model"],
) -> Float[Tensor, "batch pos d_model"]:
    """``x * mix + shifted * (1 - mix)``, per channel (RWKV's ``time_mix_*``)."""
    return shifted + mix * (x - shifted)


def mix_ramp(width: int, power: float) -> Float[Tensor, " width"]:
    """``(i / width) ** power`` per channel: RWKV's initial token-shift mixes."""
    return (torch.arange(width, dtype=torch.float32) / width) ** power
