"""Matryoshka reconstructions: every prefix of the dictionary decoded, in one sparse pass.

A Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024) with prefix widths
``w_1 < ... < w_M = d_sae`` is trained so that each prefix reconstructs on its
own: ``x_hat_j = f[:, :w_j] W_dec[:w_j] + b_dec``. Split the latents into the
levels ``[w_{j-1}, w_j)`` and let ``D_s`` be the decode of level ``s`` alone
(``f[:, w_{s-1}:w_s] W_dec[w_{s-1}:w_s]``). Then

    x_hat_j = b_dec + sum_{s <= j} D_s            (a cumulative sum over levels)

and for a loss ``L = sum_j l_j(x_hat_j)``

    dL/dD_s = sum_{j >= s} dl_j/dx_hat_j          (a reverse cumulative sum)

so every level's decode, forward and backward, is one sparse product over the
active entries: cost ``nnz * d_out`` for all levels together, plus
``M * batch * d_out`` for the sums. The decode of all levels is a single
``sparse_decode`` whose "rows" are (row, level) pairs: codes are stored
row-major with latents ascending within a row, and the level of a latent
never decreases as the latent grows, so ``row * M + level`` is already sorted,
which is all ``SparsePattern`` needs. Autograd's backward of the cumulative sum
is the reverse cumulative sum above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mitk.sae.sparse_ops import SparsePattern, sparse_decode
from mitk.shapes import Float


def prefix_reconstructions(
    values: Float[Tensor, " nnz"],
    pattern: SparsePattern,
    W_dec: Float[Tensor, "d_sae d_out"],
    offset: Float[Tensor, "*#batch d_out"],
    widths: Sequence[int],
) -> Float[Tensor, "batch levels d_out"]:
    """``out[:, j] = codes[:, :widths[j]] @ W_dec[:widths[j]] + offset`` for every level ``j``.

    ``values`` at ``pattern`` are the codes (rows in order, latents ascending
    within a row, as ``SparseCodes`` keeps them); ``offset`` is ``b_dec`` (plus a
    skip-transcoder's skip term, per row). ``widths`` increase and end at
    ``d_sae``. Differentiable in ``values``, ``W_dec`` and ``offset``.
    """
    levels = len(widths)
    bounds = torch.tensor(widths[:-1], dtype=pattern.latents.dtype, device=pattern.latents.device)
    level = torch.searchsorted(bounds, pattern.latents, right=True)
    by_level = SparsePattern(
        pattern.rows * levels + level, pattern.latents, pattern.n_rows * levels, pattern.d_sae
    )
    parts = sparse_decode(values, W_dec, by_level).view(pattern.n_rows, levels, -1)
    return parts.cumsum(1) + offset.unsqueeze(-2)
