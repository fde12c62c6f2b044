"""The geometric median, a robust centre used to initialise an SAE's decoder bias."""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Float


@torch.no_grad()
def geometric_median(
    points: Float[Tensor, "n d"], max_iter: int = 100, tol: float = 1e-6
) -> Float[Tensor, " d"]:
    """The point minimising the sum of Euclidean distances to ``points`` (Weiszfeld's method).

    Computed in float64 and returned in the input's dtype. Stops when a step
    moves less than ``tol`` relative to the spread of the points, or after
    ``max_iter`` steps; starts from the mean, so it is never worse than it.
    """
    x = points.double()
    median = x.mean(0)
    scale = (x - median).norm(dim=-1).mean().clamp_min(1e-12)
    for _ in range(max_iter):
        # a point sitting on the median would get infinite weight; floor the distance
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-8 * float(scale))
        new = (weights[:, None] * x).sum(0) / weights.sum()
        moved = float((new - median).norm())
        median = new
        if moved < tol * float(scale):
            break
    return median.to(points.dtype)
