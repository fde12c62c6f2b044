"""Encoder gather and sparse decode with hand-written, ``nnz * d_in`` backward passes.

Once a batch's codes are sparse, only the active entries carry a value or a
gradient, so every product of a training step but the encoder's forward
matmul can touch just those entries:

- decoding is a weighted sum of the active decoder rows (``embedding_bag``);
- the decoder's weight gradient and the encoder's weight gradient are the same
  kind of sum, taken per latent instead of per row (entries grouped by latent);
- the latent gradients are the residual gradient times the decoder, sampled at
  the active entries only (a sampled dense-dense matmul).

Autograd's own route for these (the ``embedding_bag`` backward, or the
``masked_select`` scatter into a dense gradient and a dense ``x^T G``) sorts
indices, fills dense ``[batch, d_sae]`` buffers and runs a full matmul; these
functions compute the same numbers without them. Every op they use has CPU and
CUDA kernels; the ``SPARSE_DENSITY`` cut-over in ``losses`` was measured on CPU.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any
import warnings

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Float, Int


def offsets_of(groups: Int[Tensor, " nnz"], n_groups: int) -> Int[Tensor, " n_groups"]:
    """Start of each group's entries in a sorted list of group ids (``embedding_bag`` offsets)."""
    return torch.searchsorted(groups, torch.arange(n_groups, device=groups.device))


class SparsePattern:
    """Where a batch's active entries sit: row-major lists of rows and latents.

    ``rows`` must be non-decreasing (each row's entries together). The grouping
    by latent that the weight gradients need is computed on first use, once,
    and shared by every backward pass that reads this pattern.
    """

    def __init__(
        self,
        rows: Int[Tensor, " nnz"],
        latents: Int[Tensor, " nnz"],
        n_rows: int,
        d_sae: int,
        row_offsets: Int[Tensor, " batch"] | None = None,
    ) -> None:
        self.rows, self.latents, self.n_rows, self.d_sae = rows, latents, n_rows, d_sae
        # start of each row's entries, as embedding_bag wants them
        self.row_offsets = offsets_of(rows, n_rows) if row_offsets is None else row_offsets

    @property
    def nnz(self) -> int:
        return self.rows.shape[0]

    @cached_property
    def by_latent(self) -> tuple[Int[Tensor, " nnz"], Int[Tensor, " nnz"], Int[Tensor, " d_sae"]]:
        """``(order, rows[order], offsets)``: entries grouped by latent, rows ascending within."""
        latents, order = torch.sort(self.latents, stable=True)
        return order, self.rows[order], offsets_of(latents, self.d_sae)

    def per_latent_sum(
        self, weights: Float[Tensor, " nnz"], table: Float[Tensor, "batch width"]
    ) -> Float[Tensor, "d_sae width"]:
        """``out[i] = sum over entries e of latent i of weights[e] * table[rows[e]]``.

        That is ``C^T table`` for the sparse ``[batch, d_sae]`` matrix ``C``
        holding ``weights`` at this pattern: the weight gradients of both maps.
        """
        order, rows, offsets = self.by_latent
        return F.embedding_bag(
            rows, table, offsets, mode="sum", per_sample_weights=weights[order].to(table.dtype)
        )

    def sampled_matmul(
        self, left: Float[Tensor, "batch width"], right: Float[Tensor, "d_sae width"]
    ) -> Float[Tensor, " nnz"]:
        """``(left @ right.T)[rows[e], latents[e]]`` for every entry, and no other."""
        if self.nnz == 0:
            return left.new_zeros(0)
        dtype = left.dtype
        if dtype not in (torch.float32, torch.float64):  # no half-precision kernel on CPU
            left, right = left.float(), right.float()
        pattern = self._csr(left.new_zeros(self.nnz))
        out = torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0)
        return out.values().to(dtype)

    def times(
        self, values: Float[Tensor, " nnz"], dense: Float[Tensor, "d_sae width"]
    ) -> Float[Tensor, "batch width"]:
        """``C @ dense`` for the sparse ``C`` holding ``values`` at this pattern."""
        return F.embedding_bag(
            self.latents, dense, self.row_offsets, mode="sum", per_sample_weights=values
        )

    def _csr(self, values: Tensor) -> Tensor:
        end = self.row_offsets.new_tensor([self.nnz])
        with warnings.catch_warnings():
            # PyTorch flags CSR tensors as beta on first use; the ops used here are stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            with torch.sparse.check_sparse_tensor_invariants(enable=False):
                return torch.sparse_csr_tensor(
                    torch.cat([self.row_offsets, end]),
                    self.latents,
                    values,
                    (self.n_rows, self.d_sae),
                )


class _GatheredPreActivations(torch.autograd.Function):
    """``(x W_enc + bias)`` read at the pattern's entries, from a precomputed ``pre``."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, W_enc: Tensor, bias: Tensor, pre: Tensor, pattern: SparsePattern
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc)
        ctx.pattern = pattern
        flat = pattern.rows * pattern.d_sae + pattern.latents
        return pre.detach().reshape(-1).index_select(0, flat)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        grad_x = pattern.times(grad, W_enc.t().contiguous()) if need_x else None
        grad_w = pattern.per_latent_sum(grad, x).t() if need_w else None
        grad_bias = (
            torch.bincount(pattern.latents, weights=grad, minlength=pattern.d_sae).to(grad.dtype)
            if need_bias
            else None
        )
        return grad_x, grad_w, grad_bias, None, None


class _SparseDecode(torch.autograd.Function):
    """``C @ W_dec`` for codes ``C`` holding ``values`` at the pattern's entries."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return pattern.times(values, W_dec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        values, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need_values, need_w = ctx.needs_input_grad[:2]
        grad_values = pattern.sampled_matmul(grad, W_dec) if need_values else None
        grad_w = pattern.per_latent_sum(values, grad) if need_w else None
        return grad_values, grad_w, None


def gathered_pre_activations(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    bias: Float[Tensor, " d_sae"],
    pre: Float[Tensor, "batch d_sae"],
    pattern: SparsePattern,
) -> Float[Tensor, " nnz"]:
    """Pre-activations at the pattern's entries, differentiable in ``x``, ``W_enc``, ``bias``.

    ``pre`` must equal ``x @ W_enc + bias`` (computed once by the caller, who
    needed it to find the entries); its values are read, its graph is not
    used. The backward costs ``nnz * d_in`` per input, not a dense matmul.
    """
    out: Tensor = _GatheredPreActivations.apply(x, W_enc, bias, pre, pattern)
    return out


def sparse_decode(
    values: Float[Tensor, " nnz"], W_dec: Float[Tensor, "d_sae d_in"], pattern: SparsePattern
) -> Float[Tensor, "batch d_in"]:
    """``codes @ W_dec`` (no bias) for codes holding ``values`` at the pattern's entries."""
    out: Tensor = _SparseDecode.apply(values, W_dec, pattern)
    return out
