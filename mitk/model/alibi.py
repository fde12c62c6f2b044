"""ALiBi (Press et al., "Train Short, Test Long"): a per-head linear penalty on distance.

No position enters the residual stream; instead each head adds
``slope_h * (key_pos - query_pos)`` to its attention scores. The bias is a
float tensor, so the fused kernel takes it as an additive ``attn_mask`` and
attention stays fused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mitk.shapes import Float, Int


def alibi_slopes(n_heads: int) -> Float[Tensor, " head"]:
    """The paper's slopes: a geometric sequence from ``2^(-8/n)``.

    For a head count that is not a power of two, the slopes of the nearest
    smaller power of two are followed by every other slope of the next one up
    (the paper's recipe, which BLOOM follows).
    """

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: Float[Tensor, " head"],
    query_positions: Int[Tensor, "#batch q_pos"],
    key_positions: Int[Tensor, "#batch k_pos"],
) -> Float[Tensor, "#batch head q_pos k_pos"]:
    """``slope_h * (key_pos - query_pos)``: zero on the diagonal, negative for earlier keys."""
    distance = (key_positions[:, None, :] - query_positions[:, :, None]).float()
    return slopes.to(distance.device)[None, :, None, None] * distance[:, None]
