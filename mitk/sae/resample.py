"""Resampling silent latents: re-initialise them towards what the dictionary reconstructs worst.

Bricken et al. ("Towards Monosemanticity", 2023) revive dead neurons by pointing them
at inputs the SAE reconstructs badly. mitk does the same for the penalised
architectures (``relu``, ``jumprelu``, ``gated``), whose latents, once silent, get no
gradient to find their way back: a JumpReLU latent below its threshold on every row, or
a gated one whose gate never opens, learns nothing. (The TopK families have AuxK.)

Measured on ground truth (``bench/sae_defaults.py``, 512 latents for 512 features,
2M rows): without resampling a JumpReLU run ended with 96 latents firing on fewer
than 0.1% of held-out rows, pointing nowhere (best cosine to any feature <= 0.5),
and 99 features unfound; resampling every 5% of the run left 25 and 28.

A resampled latent is a freshly initialised one whose direction is taken from a
row of the current batch, drawn with probability proportional to the square of
its squared reconstruction error:

- decoder row: the row's residual ``y - y_hat`` at the initial decoder norm;
- encoder column: the same direction for an SAE (it reads the space it
  reconstructs); a transcoder's reads the input, so the row's centred input;
  at the initial norm either way (``W_enc = W_dec^T`` at initialisation);
- encoder bias 0, JumpReLU threshold back to its initial value;
- Adam's moments for every one of its parameters zeroed, so stale momentum
  does not throw it straight back.

Everything is a function of the batch, the weights and the step, so a resumed run
resamples exactly as an uninterrupted one, and every process of a distributed run
(each holds the whole global batch) does the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.shapes import Float, Int


def resample_due(cfg: SAEConfig, done: int) -> bool:
    """Whether the step that completes ``done`` steps ends with a resampling."""
    every = cfg.resample_interval
    return every > 0 and done % every == 0 and done <= cfg.resample_until * cfg.total_steps


@torch.no_grad()
def resample_silent_(
    sae: SparseAutoencoder,
    idle_steps: Int[Tensor, " d_sae"],
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    optimizer: torch.optim.Optimizer,
    seed: int,
) -> int:
    """Resample the latents idle for ``cfg.resample_window`` rows; returns how many.

    ``idle_steps`` counts the steps since each latent last fired; the resampled
    latents' counts restart at 0. See ``resample_`` for the arguments.
    """
    silent = (idle_steps * sae.cfg.batch_size >= sae.cfg.resample_window).nonzero().squeeze(1)
    if not resample_(sae, silent, x, y, optimizer, seed):
        return 0
    idle_steps[silent] = 0
    return silent.numel()


@torch.no_grad()
def resample_(
    sae: SparseAutoencoder,
    latents: Int[Tensor, " n"],
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    optimizer: torch.optim.Optimizer,
    seed: int,
) -> bool:
    """Re-initialise ``latents`` of ``sae`` towards the rows of ``x`` it reconstructs worst.

    ``y`` is what the SAE reconstructs (``x`` itself for an SAE); ``seed`` fixes the
    draw of rows. ``optimizer`` must hold the SAE's parameters (their Adam moments
    are cleared for these latents). False when nothing changed: no latents given,
    or no row with any error to point them at.
    """
    if latents.numel() == 0:
        return False
    cfg = sae.cfg
    residual = y - sae(x).reconstruction
    error = residual.pow(2).sum(-1)
    weights = error.pow(2)
    if not bool(weights.sum() > 0):  # a perfect reconstruction: nothing to point at
        return False
    generator = torch.Generator(device="cpu").manual_seed(seed)
    many = latents.numel() > int((weights > 0).sum())
    rows = torch.multinomial(weights.cpu().double(), latents.numel(), many, generator=generator)
    rows = rows.to(x.device)
    decoder = _unit(residual[rows]) * cfg.decoder_init_norm
    reads = decoder if not cfg.is_transcoder else _unit(x[rows] - x.mean(0))
    sae.W_dec[latents] = decoder.to(sae.W_dec.dtype)
    sae.W_enc[:, latents] = (_unit(reads) * cfg.decoder_init_norm).T.to(sae.W_enc.dtype)
    for vector in _latent_vectors(sae):  # biases 0; gated's r_mag 0 is a magnitude scale of 1
        vector[latents] = 0
    if cfg.architecture == "jumprelu":
        sae.log_threshold[latents] = torch.tensor(cfg.jumprelu_init_threshold).log()
    _clear_moments(sae, latents, optimizer)
    return True


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _latent_vectors(sae: SparseAutoencoder) -> list[Tensor]:
    """The ``[d_sae]`` biases and scales a fresh latent starts at 0 (the threshold aside)."""
    names = ("b_gate", "b_mag", "r_mag") if sae.cfg.architecture == "gated" else ("b_enc",)
    return [getattr(sae, name) for name in names]


def _clear_moments(
    sae: SparseAutoencoder, latents: Tensor, optimizer: torch.optim.Optimizer
) -> None:
    """Zero Adam's running moments of the latents' slices of every per-latent parameter."""
    slices: list[tuple[Tensor, tuple[slice | Tensor, ...]]] = [
        (sae.W_dec, (latents,)),
        (sae.W_enc, (slice(None), latents)),
    ]
    slices += [(vector, (latents,)) for vector in _latent_vectors(sae)]
    if sae.cfg.architecture == "jumprelu":
        slices.append((sae.log_threshold, (latents,)))
    for parameter, where in slices:
        moments = optimizer.state.get(parameter, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in moments:
                moments[name][where] = 0
