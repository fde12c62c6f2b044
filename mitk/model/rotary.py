"""Rotary position embeddings (Su et al., RoFormer): rotate query/key pairs by position.

Each rotated pair of dimensions turns by ``position * base^(-2i / rotary_dim)``,
so ``q(m)·k(n)`` depends on positions only through ``m - n``. Two layouts of
the pairs exist in the wild: ``neox`` pairs dimension ``i`` with
``i + rotary_dim/2`` (LLaMA, GPT-NeoX, Mistral, Qwen2) and ``gptj`` pairs
``2i`` with ``2i+1`` (GPT-J). With ``rotary_dim < d_head`` (partial rotary)
the trailing dimensions pass through unrotated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.config import RotaryStyle
from mitk.shapes import Float, Int


def rotary_angles(
    positions: Int[Tensor, "#batch pos"], rotary_dim: int, base: float
) -> Float[Tensor, "#batch pos half"]:
    """Angle of each rotated pair at each position, in fp32 (``half = rotary_dim // 2``)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (base ** (exponents.float() / rotary_dim))
    return positions.float()[..., None] * inv_freq


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    angles: Float[Tensor, "#batch pos half"],
    style: RotaryStyle,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``2 * half`` dimensions of every head of ``x`` by ``angles``."""
    rotary_dim = 2 * angles.shape[-1]
    # cos/sin in fp32, then cast, as the reference implementations do
    cos = angles.cos()[:, :, None].to(x.dtype)
    sin = angles.sin()[:, :, None].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if style == "neox":
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
