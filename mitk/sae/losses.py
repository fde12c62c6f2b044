"""Training losses of the four SAE architectures, with the statistics training tracks.

Reconstruction error is the squared L2 distance summed over ``d_in`` and
averaged over rows, for every architecture, so loss values compare across them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.codes import SparseCodes, jumprelu, step
from mitk.shapes import Bool, Float, Int


class LossParts(NamedTuple):
    """One training batch: the loss to minimise, its parts and what the metrics need.

    Only ``loss`` carries a graph; every other field is detached.
    """

    loss: Float[Tensor, ""]
    mse: Float[Tensor, ""]
    sparsity: Float[Tensor, ""]
    """The sparsity term as added to the loss (coefficient and warmup applied)."""
    aux: Float[Tensor, ""]
    """The AuxK term as added to the loss (0 without dead latents or outside TopK)."""
    fire_counts: Int[Tensor, " d_sae"]
    """Rows on which each latent was non-zero."""
    reconstruction: Float[Tensor, "batch d_in"]
    min_active: Float[Tensor, ""]
    """Smallest positive latent value (BatchTopK's threshold estimate); inf if none."""


def sae_loss(
    sae: SparseAutoencoder,
    x: Float[Tensor, "batch d_in"],
    sparsity_scale: float = 1.0,
    dead: Bool[Tensor, " d_sae"] | None = None,
) -> LossParts:
    """The architecture's training loss on ``x``.

    ``sparsity_scale`` in [0, 1] is the warmup factor on the L1/L0 coefficient;
    ``dead`` marks latents that count as dead for the AuxK loss (TopK family).
    """
    cfg = sae.cfg
    pre = sae.pre_activations(x)
    zero = x.new_zeros(())
    if cfg.uses_k:
        codes = sae.training_codes(pre)
        recon = sae.decode_codes(codes)
        mse = _squared_error(recon, x)
        aux = zero
        if dead is not None and bool(dead.any()) and cfg.aux_coefficient > 0:
            aux = cfg.aux_coefficient * _auxk_loss(sae, pre, x - recon.detach(), dead)
        active = codes.values > 0
        counts = torch.bincount(codes.latents[active], minlength=cfg.d_sae)
        return LossParts(mse + aux, mse.detach(), zero, aux.detach(), counts, recon.detach(),
                         _min_positive(codes.values))  # fmt: skip
    if cfg.architecture == "relu":
        latents = pre.relu()
        recon = latents @ sae.W_dec + sae.b_dec
        mse = _squared_error(recon, x)
        penalty = (latents * sae.decoder_norms()).sum(-1).mean()
        sparsity = sparsity_scale * cfg.l1_coefficient * penalty
    else:
        threshold = sae.threshold
        latents = jumprelu(pre, threshold, cfg.jumprelu_bandwidth)
        recon = latents @ sae.W_dec + sae.b_dec
        mse = _squared_error(recon, x)
        l0_smooth = step(pre, threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        sparsity = sparsity_scale * cfg.l0_coefficient * l0_smooth
    counts = (latents > 0).sum(0)
    return LossParts(mse + sparsity, mse.detach(), sparsity.detach(), zero, counts,
                     recon.detach(), _min_positive(latents))  # fmt: skip


def _min_positive(values: Tensor) -> Tensor:
    positive = values.detach()[values.detach() > 0]
    return positive.min() if positive.numel() else values.new_tensor(float("inf"))


def _squared_error(recon: Tensor, x: Tensor) -> Tensor:
    return (recon - x).pow(2).sum(-1).mean()


def _auxk_loss(
    sae: SparseAutoencoder, pre: Tensor, residual: Tensor, dead: Tensor
) -> Float[Tensor, ""]:
    """Gao et al.'s AuxK: the top dead latents must explain what the main code missed.

    Normalised by the residual's own variance, so its scale does not drift as
    the reconstruction improves.
    """
    k_aux = min(sae.cfg.aux_k, int(dead.sum()))
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(k_aux, dim=-1, sorted=False)
    n_rows = pre.shape[0]
    offsets = torch.arange(0, n_rows * k_aux, k_aux, device=pre.device)
    codes = SparseCodes(top.values.relu().flatten(), top.indices.flatten(), offsets, sae.cfg.d_sae)
    aux_recon = F.embedding_bag(
        codes.latents, sae.W_dec, codes.offsets, mode="sum", per_sample_weights=codes.values
    )
    error = (aux_recon - residual).pow(2).sum()
    spread = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return error / spread
