"""Training losses of the SAE architectures, with the statistics training tracks.

Reconstruction error is the squared L2 distance summed over ``d_out`` and
averaged over rows, for every architecture, so loss values compare across them.
A transcoder's error is against its target; a skip-transcoder's reconstruction
includes its skip term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.codes import SparseCodes, jumprelu, step
from mitk.sae.dense_ops import column_counts, relu_decode
from mitk.sae.matryoshka import prefix_reconstructions
from mitk.sae.sparse_ops import SparsePattern, gathered_pre_activations, sparse_decode
from mitk.shapes import Bool, Float, Int

SPARSE_DENSITY = 0.05
"""ReLU/JumpReLU/gated losses gather their entries when at most this fraction of them is kept."""


class LossParts(NamedTuple):
    """One training batch: the loss to minimise, its parts and what the metrics need.

    Only ``loss`` carries a graph; every other field is detached.
    """

    loss: Float[Tensor, ""]
    mse: Float[Tensor, ""]
    """Reconstruction error of the whole dictionary (Matryoshka: the loss adds its prefixes')."""
    sparsity: Float[Tensor, ""]
    """The sparsity term as added to the loss (coefficient and warmup applied)."""
    aux: Float[Tensor, ""]
    """The AuxK term as added to the loss (0 without dead latents or outside TopK); gated:
    the auxiliary reconstruction through the gate."""
    fire_counts: Int[Tensor, " d_sae"]
    """Rows on which each latent was non-zero."""
    reconstruction: Float[Tensor, "batch d_out"]
    min_active: Float[Tensor, ""]
    """TopK family: smallest positive latent value (BatchTopK's threshold estimate); else inf."""


def sae_loss(
    sae: SparseAutoencoder,
    x: Float[Tensor, "batch d_in"],
    sparsity_scale: float = 1.0,
    dead: Bool[Tensor, " d_sae"] | None = None,
    target: Float[Tensor, "batch d_out"] | None = None,
) -> LossParts:
    """The architecture's training loss on ``x``.

    ``sparsity_scale`` in [0, 1] is the warmup factor on the L1/L0 coefficient;
    ``dead`` marks latents that count as dead for the AuxK loss (TopK family);
    ``target`` is what a transcoder reconstructs (default: ``x`` itself).

    Matryoshka BatchTopK sums the error of every prefix ``matryoshka_widths``
    (the whole dictionary included, each weighted 1, as SAELens does). Gated
    SAEs add Rajamanoharan et al.'s auxiliary loss: ``ReLU(pi_gate)`` decoded by
    a frozen copy of the decoder must reconstruct the target too.
    """
    cfg = sae.cfg
    y = x if target is None else target
    if cfg.architecture == "gated":
        return _gated_loss(sae, x, y, sparsity_scale)
    if not cfg.uses_k:
        return _thresholded_loss(sae, x, y, sparsity_scale)
    bias = sae.encoder_bias()
    pre = torch.addmm(bias, x, sae.W_enc)
    picked = sae.training_codes(pre.detach())
    pattern = picked.pattern()
    # the picked entries' gradients reach the encoder without a dense [batch, d_sae] buffer
    values = gathered_pre_activations(x, sae.W_enc, bias, pre, pattern).relu()
    offset = _output_offset(sae, x)
    if cfg.architecture == "matryoshka_batchtopk":
        prefixes = prefix_reconstructions(values, pattern, sae.W_dec, offset, cfg.matryoshka_widths)
        errors = (prefixes - y.unsqueeze(1)).pow(2).sum(-1).mean(0)  # one per level
        recon, mse, fit = prefixes[:, -1], errors[-1], errors.sum()
    else:
        recon = sparse_decode(values, sae.W_dec, pattern) + offset
        mse = fit = _squared_error(recon, y)
    zero = x.new_zeros(())
    aux = zero
    if dead is not None and bool(dead.any()) and cfg.aux_coefficient > 0:
        aux = cfg.aux_coefficient * _auxk_loss(sae, pre, y - recon.detach(), dead)
    active = values.detach() > 0
    counts = torch.bincount(picked.latents[active], minlength=cfg.d_sae)
    return LossParts(fit + aux, mse.detach(), zero, aux.detach(), counts, recon.detach(),
                     _min_positive(values))  # fmt: skip


def _output_offset(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """What the reconstruction adds to the decoded latents: ``b_dec`` (+ the skip term)."""
    skip = sae.skip(x)
    return sae.b_dec if skip is None else skip + sae.b_dec


def _kept_pattern(mask: Tensor) -> tuple[SparsePattern, Tensor]:
    """The pattern of a ``[batch, d_sae]`` mask's entries (row-major) and their latents."""
    n_rows, d_sae = mask.shape
    flat = mask.view(-1).nonzero().squeeze(1)  # row-major
    rows = flat.div(d_sae, rounding_mode="floor")
    kept = flat - rows * d_sae
    return SparsePattern(rows, kept, n_rows, d_sae), kept


def _gated_loss(sae: SparseAutoencoder, x: Tensor, y: Tensor, sparsity_scale: float) -> LossParts:
    """Gated SAE loss (Rajamanoharan et al. 2024), on gathered entries when the gate is sparse.

    ``f = 1[pi_gate > 0] * ReLU(pi_mag)``; loss ``||y - y_hat||^2 + l1 * sum_i
    ReLU(pi_gate)_i ||W_dec[i]|| + ||y - (ReLU(pi_gate) W_dec' + b_dec')||^2`` where
    ``'`` marks detached copies (the paper's frozen decoder; SAELens does not
    detach). Every term is zero, with zero gradient, outside ``pi_gate > 0``
    (the step has no gradient), so the gathered computation is exact.
    """
    cfg = sae.cfg
    n_rows = x.shape[0]
    bias = sae.encoder_bias()
    gate_pre = torch.addmm(bias, x, sae.W_enc)
    mask = gate_pre.detach() > 0
    norms = sae.decoder_norms()
    offset = _output_offset(sae, x)
    frozen_W, frozen_offset = sae.W_dec.detach(), offset.detach()
    if int(torch.count_nonzero(mask)) <= SPARSE_DENSITY * gate_pre.numel():
        pattern, kept = _kept_pattern(mask)
        gate = gathered_pre_activations(x, sae.W_enc, bias, gate_pre, pattern)  # all > 0
        values = sae.magnitudes(gate, kept).relu()
        recon = sparse_decode(values, sae.W_dec, pattern) + offset
        penalty = gate @ norms.index_select(0, kept) / n_rows
        via_gate = sparse_decode(gate, frozen_W, pattern) + frozen_offset
        counts = torch.bincount(kept[values.detach() > 0], minlength=cfg.d_sae)
    else:
        gate = gate_pre.relu()
        values = sae.magnitudes(gate_pre).relu() * mask
        recon = values @ sae.W_dec + offset
        penalty = gate.sum(0) @ norms / n_rows
        via_gate = gate @ frozen_W + frozen_offset
        counts = column_counts(values.detach() > 0)
    mse = _squared_error(recon, y)
    aux = _squared_error(via_gate, y)
    sparsity = sparsity_scale * cfg.l1_weight * penalty
    no_min = x.new_tensor(float("inf"))
    return LossParts(mse + sparsity + aux, mse.detach(), sparsity.detach(), aux.detach(), counts,
                     recon.detach(), no_min)  # fmt: skip


def _thresholded_loss(
    sae: SparseAutoencoder, x: Tensor, y: Tensor, sparsity_scale: float
) -> LossParts:
    """ReLU (L1) and JumpReLU (L0) losses, on gathered entries when few are kept.

    Only entries above the cutoff have a non-zero value or gradient (for JumpReLU
    that includes those within half a bandwidth below the threshold, which feed
    its pseudo-gradient), so computing on them alone is exact. Past the encoder's
    forward matmul, which finds them, every product then costs ``nnz * d_in``
    instead of ``batch x d_sae x d_in`` (see ``sparse_ops``).
    """
    cfg = sae.cfg
    n_rows = x.shape[0]
    relu = cfg.architecture == "relu"
    eps = cfg.jumprelu_bandwidth
    bias = sae.encoder_bias()
    pre = torch.addmm(bias, x, sae.W_enc)
    threshold = pre.new_zeros(()) if relu else sae.threshold
    cutoff = threshold if relu else (threshold - eps / 2).detach()
    mask = pre.detach() > cutoff
    offset = _output_offset(sae, x)
    if int(torch.count_nonzero(mask)) <= SPARSE_DENSITY * pre.numel():
        pattern, kept = _kept_pattern(mask)
        z = gathered_pre_activations(x, sae.W_enc, bias, pre, pattern)
        theta = threshold if relu else threshold.index_select(0, kept)
        values = z if relu else jumprelu(z, theta, eps)
        recon = sparse_decode(values, sae.W_dec, pattern) + offset
        if relu:
            penalty = values @ sae.decoder_norms().index_select(0, kept) / n_rows
        else:
            penalty = step(z, theta, eps).sum() / n_rows
        counts = torch.bincount(kept[values.detach() > 0], minlength=cfg.d_sae)
    elif relu:
        decoded, l1 = relu_decode(pre, sae.W_dec, sae.decoder_norms())
        recon = decoded + offset
        penalty = l1 / n_rows
        counts = column_counts(mask)
    else:
        latents = jumprelu(pre, threshold, eps)
        recon = latents @ sae.W_dec + offset
        penalty = step(pre, threshold, eps).sum() / n_rows
        counts = column_counts(latents.detach() != 0)
    mse = _squared_error(recon, y)
    coefficient = cfg.l1_weight if relu else cfg.l0_weight
    sparsity = sparsity_scale * coefficient * penalty
    # min_active feeds only BatchTopK's threshold, so it is not computed here
    no_min = x.new_tensor(float("inf"))
    return LossParts(mse + sparsity, mse.detach(), sparsity.detach(), x.new_zeros(()), counts,
                     recon.detach(), no_min)  # fmt: skip


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
    aux_recon = sparse_decode(codes.values, sae.W_dec, codes.pattern())
    error = (aux_recon - residual).pow(2).sum()
    spread = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return error / spread
