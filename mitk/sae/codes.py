"""Sparse latent codes: how each architecture picks its active latents, kept sparse.

TopK-family codes are stored as (row offsets, latent ids, values) so decoding
costs ``nnz * d_in`` instead of a dense ``batch x d_sae x d_in`` matmul, and so
does its backward pass. JumpReLU's threshold is learnt through the
straight-through estimator of Rajamanoharan et al. (2024).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from mitk.sae.sparse_ops import SparsePattern, offsets_of, sparse_decode
from mitk.shapes import Float, Int


class SparseCodes(NamedTuple):
    """Active latents of a batch, row by row (rows in order, CSR-like).

    Row ``r`` owns ``values[offsets[r]:offsets[r+1]]`` (the last row runs to the
    end) at latent indices ``latents[...]``. Values may be exactly zero
    (a TopK pick with a negative pre-activation, after the ReLU).
    """

    values: Float[Tensor, " nnz"]
    latents: Int[Tensor, " nnz"]
    offsets: Int[Tensor, " batch"]
    d_sae: int

    def to_dense(self) -> Float[Tensor, "batch d_sae"]:
        """The codes as a dense ``[batch, d_sae]`` matrix (differentiable in ``values``)."""
        n_rows = self.offsets.shape[0]
        rows = self.row_ids()
        flat = rows * self.d_sae + self.latents
        dense = self.values.new_zeros(n_rows * self.d_sae)
        return dense.index_add(0, flat, self.values).view(n_rows, self.d_sae)

    def pattern(self) -> SparsePattern:
        """Where the codes are non-zero, for the sparse products of ``sparse_ops``."""
        return SparsePattern(self.row_ids(), self.latents, self.offsets.shape[0], self.d_sae,
                             row_offsets=self.offsets)  # fmt: skip

    def row_ids(self) -> Int[Tensor, " nnz"]:
        """The row each non-zero belongs to."""
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([self.values.shape[0]]))
        return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def topk_codes(pre: Float[Tensor, "batch d_sae"], k: int) -> SparseCodes:
    """ReLU of each row's ``k`` largest pre-activations (Gao et al. 2024)."""
    top = pre.topk(k, dim=-1, sorted=False)
    n_rows = pre.shape[0]
    offsets = torch.arange(0, n_rows * k, k, device=pre.device)
    return SparseCodes(top.values.relu().flatten(), top.indices.flatten(), offsets, pre.shape[1])


def batch_topk_codes(pre: Float[Tensor, "batch d_sae"], k: int) -> SparseCodes:
    """The ``batch * k`` largest ReLU'd pre-activations of the whole batch (Bussmann et al. 2024).

    Rows get different numbers of latents; on average ``k``.
    """
    n_rows, d_sae = pre.shape
    top = pre.relu().flatten().topk(n_rows * k, sorted=False)
    flat, order = top.indices.sort()  # row-major order groups each row's picks together
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    return SparseCodes(top.values[order], flat - rows * d_sae, offsets_of(rows, n_rows), d_sae)


def decode_sparse(
    codes: SparseCodes, W_dec: Float[Tensor, "d_sae d_in"], b_dec: Float[Tensor, " d_in"]
) -> Float[Tensor, "batch d_in"]:
    """``codes @ W_dec + b_dec`` touching only the active rows of ``W_dec``, backward included."""
    return sparse_decode(codes.values, W_dec, codes.pattern()) + b_dec


class _JumpReLU(torch.autograd.Function):
    """``z * H(z - theta)``; d/dtheta by the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((z - threshold).abs() < eps / 2).to(grad.dtype)
        grad_z = grad * (z > threshold)
        grad_threshold = (-(threshold / eps) * near * grad).sum_to_size(threshold.shape)
        return grad_z, grad_threshold, None


class _Step(torch.autograd.Function):
    """``H(z - theta)``: no gradient to ``z``; d/dtheta by the rectangle-kernel estimator."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((z - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (-(1.0 / eps) * near * grad).sum_to_size(threshold.shape), None


def jumprelu(
    z: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, "*#batch d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """JumpReLU: keep ``z`` where it exceeds the latent's threshold, else 0.

    ``threshold`` broadcasts against ``z`` (``[d_sae]`` for a batch, or one per
    element when ``z`` holds gathered entries); its gradient is summed back to its shape.
    """
    out: Tensor = _JumpReLU.apply(z, threshold, bandwidth)
    return out


def step(
    z: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, "*#batch d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """Heaviside step ``H(z - threshold)``, the differentiable L0 count of JumpReLU SAEs.

    ``threshold`` broadcasts against ``z`` as in ``jumprelu``.
    """
    out: Tensor = _Step.apply(z, threshold, bandwidth)
    return out
