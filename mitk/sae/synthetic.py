"""Ground truth for SAEs: data made from a known overcomplete dictionary (Sharkey et al. 2022).

Each row is a sparse non-negative combination of unit-norm ground-truth
features; an SAE that learns the right dictionary has decoder rows pointing
along those features, which ``mean_max_cosine_similarity`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.errors import ConfigError, ShapeMismatchError
from mitk.shapes import Float


@dataclass(frozen=True)
class SparseDictionaryData:
    """A random overcomplete dictionary and a sampler of sparse combinations of it.

    ``features [n_features, d_in]`` has unit-norm rows drawn uniformly on the
    sphere. A row of data switches each feature on independently with
    probability ``mean_active / n_features`` and gives it a coefficient drawn
    uniformly from ``[0, 1)``.
    """

    d_in: int
    n_features: int
    mean_active: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.n_features <= 0:
            raise ConfigError("d_in and n_features must be positive")
        if not 0 < self.mean_active <= self.n_features:
            raise ConfigError(f"mean_active must lie in (0, n_features], got {self.mean_active}")

    @property
    def features(self) -> Float[Tensor, "n_features d_in"]:
        """The ground-truth dictionary (the same for the same seed)."""
        gen = torch.Generator().manual_seed(self.seed)
        raw = torch.randn(self.n_features, self.d_in, generator=gen)
        return raw / raw.norm(dim=-1, keepdim=True)

    def coefficients(self, n: int, seed: int = 1) -> Float[Tensor, "n n_features"]:
        """Sparse non-negative coefficients of ``n`` rows."""
        gen = torch.Generator().manual_seed(seed)
        on = torch.rand(n, self.n_features, generator=gen) < self.mean_active / self.n_features
        return torch.rand(n, self.n_features, generator=gen) * on

    def sample(self, n: int, seed: int = 1) -> Float[Tensor, "n d_in"]:
        """``n`` rows of data, ``coefficients(n, seed) @ features``."""
        return self.coefficients(n, seed) @ self.features


def mean_max_cosine_similarity(
    learned: Float[Tensor, "d_sae d_in"], truth: Float[Tensor, "n_features d_in"]
) -> float:
    """For each true feature, the best cosine with any learned direction; averaged.

    1.0 means every ground-truth feature has a learned decoder row exactly
    along it. Pass decoder rows (``sae.W_dec``) as ``learned``.
    """
    if learned.shape[-1] != truth.shape[-1]:
        raise ShapeMismatchError(
            f"learned directions have width {learned.shape[-1]}, the truth {truth.shape[-1]}"
        )
    unit_learned = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_truth = truth / truth.norm(dim=-1, keepdim=True)
    cosines = unit_truth.double() @ unit_learned.double().T
    return float(cosines.max(dim=1).values.mean())
