"""Reconstruction and sparsity statistics, defined once and accumulated over batches.

FVU (fraction of variance unexplained) is ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
over all rows seen, with ``mean(x)`` the mean over those same rows;
explained variance is ``1 - FVU``. Per-batch FVUs are never averaged, since
that weights small batches and batch-level means differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mitk.shapes import Float


@dataclass
class ReconstructionStats:
    """Running sums for FVU, L0 and latent firing frequencies over many batches."""

    d_in: int
    d_sae: int
    rows: int = 0
    squared_error: float = 0.0
    _sum_x: Tensor | None = field(default=None, repr=False)
    _sum_sq_norm: float = 0.0
    _active: float = 0.0
    _fires: Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def update(
        self,
        x: Float[Tensor, "batch d_in"],
        reconstruction: Float[Tensor, "batch d_in"],
        latents: Float[Tensor, "batch d_sae"] | None = None,
        fires: Tensor | None = None,
        active: float | None = None,
    ) -> None:
        """Add one batch. Give dense ``latents``, or (for sparse codes) ``fires`` + ``active``.

        ``fires`` counts, per latent, the rows it was non-zero on; ``active`` is
        the total number of non-zeros in the batch.
        """
        x64 = x.double()
        self.rows += x.shape[0]
        self.squared_error += float((reconstruction.double() - x64).pow(2).sum())
        sum_x = x64.sum(0)
        self._sum_x = sum_x if self._sum_x is None else self._sum_x + sum_x
        self._sum_sq_norm += float(x64.pow(2).sum())
        if latents is not None:
            nonzero = latents != 0
            fires, active = nonzero.sum(0), float(nonzero.sum())
        if fires is None or active is None:
            raise ValueError("pass dense latents, or both fires and active")
        fires = fires.to(torch.float64)
        self._fires = fires if self._fires is None else self._fires + fires
        self._active += active

    def combine_(self, average_: Callable[[list[Tensor]], None], n_parts: int) -> None:
        """Turn per-process sums into totals, given an in-place all-reduce mean."""
        if n_parts == 1 or self._sum_x is None or self._fires is None:
            return
        scalars = torch.tensor(
            [self.rows, self.squared_error, self._sum_sq_norm, self._active], dtype=torch.float64
        )
        parts = [scalars, self._sum_x, self._fires]
        average_(parts)
        for part in parts:
            part *= n_parts
        self.rows = round(float(scalars[0]))
        self.squared_error, self._sum_sq_norm, self._active = (float(v) for v in scalars[1:])

    @property
    def fvu(self) -> float:
        """Fraction of variance unexplained over every row seen."""
        if self._sum_x is None:
            return float("nan")
        variance = self._sum_sq_norm - float(self._sum_x.pow(2).sum()) / self.rows
        return self.squared_error / variance if variance > 0 else float("nan")

    @property
    def explained_variance(self) -> float:
        """``1 - fvu``."""
        return 1.0 - self.fvu

    @property
    def mse(self) -> float:
        """Mean squared error per row (summed over ``d_in``)."""
        return self.squared_error / max(self.rows, 1)

    @property
    def l0(self) -> float:
        """Mean number of non-zero latents per row."""
        return self._active / max(self.rows, 1)

    def frequencies(self) -> Float[Tensor, " d_sae"]:
        """Fraction of rows on which each latent fired."""
        if self._fires is None:
            return torch.zeros(self.d_sae, dtype=torch.float64)
        return self._fires.cpu() / self.rows

    def dead_fraction(self) -> float:
        """Fraction of latents that never fired on the rows seen."""
        return float((self.frequencies() == 0).double().mean())

    def dense_fraction(self, threshold: float) -> float:
        """Fraction of latents that fired on more than ``threshold`` of the rows."""
        return float((self.frequencies() > threshold).double().mean())
