"""Evaluating an SAE: reconstruction and sparsity over a set of activations, and with a
model, how much next-token loss its reconstruction costs when spliced in.

Every reconstruction metric comes from ``ReconstructionStats`` (the one definition
of FVU, L0 and dead/dense latents), accumulated over the whole evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Protocol, runtime_checkable
import warnings

import pandas as pd
import torch
from torch import Tensor

from mitk.errors import ConfigError, ShapeMismatchError, UnknownHookError
from mitk.hooks import HookPoint
from mitk.model import HookedTransformer
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.collapse import CollapseWarning
from mitk.sae.metrics import ReconstructionStats
from mitk.sae.splice import Splice, resolve_hook_name, spliced
from mitk.shapes import Bool, Float, Int

_CE_FIELDS = (
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero_ablated",
    "ce_loss_recovered",
    "ce_loss_increase",
)


@runtime_checkable
class ActivationBatches(Protocol):
    """What ``evaluate`` reads from an activation source (``ActivationStore`` and kin fit).

    A ``scale(hook_name)`` method, when present, is the factor the batches were
    multiplied by; ``evaluate`` divides it out, since SAEs read raw activations.
    """

    hook_names: tuple[str, ...]

    def batch(self, step: int) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class SAEEvaluation:
    """Metrics of one SAE on one evaluation set.

    Reconstruction metrics cover ``rows`` activation rows; ``mse`` is the squared
    error summed over ``d_in``, averaged over rows. The ``ce_*`` losses (nats per
    predicted token, over the same tokens for all three) are None when no model
    was given. ``ce_loss_recovered = (zero - spliced) / (zero - clean)`` is NaN
    when zero-ablating the hook barely changes the loss; ``notes`` says so.
    """

    hook_name: str
    rows: int
    l0: float
    fvu: float
    explained_variance: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    latent_frequencies: Float[Tensor, " d_sae"]
    ce_loss_clean: float | None = None
    ce_loss_spliced: float | None = None
    ce_loss_zero_ablated: float | None = None
    ce_loss_recovered: float | None = None
    ce_loss_increase: float | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, float]:
        """Every scalar metric that was measured, by name (no frequencies, no notes)."""
        names = ("rows", "l0", "fvu", "explained_variance", "mse", "dead_fraction",
                 "dense_fraction", *_CE_FIELDS)  # fmt: skip
        values = {name: getattr(self, name) for name in names}
        return {name: float(value) for name, value in values.items() if value is not None}

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per measured metric (``hook_name``, ``metric``, ``value``)."""
        metrics = self.to_dict()
        return pd.DataFrame({
            "hook_name": [self.hook_name] * len(metrics),
            "metric": list(metrics),
            "value": list(metrics.values()),
        })  # fmt: skip


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    activations: Float[Tensor, "*rows d_in"] | ActivationBatches | None = None,
    *,
    hook_name: str | None = None,
    n_batches: int = 16,
    rows_per_batch: int = 4096,
    model: HookedTransformer | None = None,
    tokens: Int[Tensor, "batch pos"] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    sequences_per_batch: int = 8,
    targets: Float[Tensor, "*rows d_out"] | None = None,
) -> SAEEvaluation:
    """L0, FVU, dead/dense latents and, given ``model`` and ``tokens``, the loss cost of the SAE.

    - ``activations``: a tensor ``[..., d_in]`` (read ``rows_per_batch`` rows at a
      time), or a source with ``batch(step)`` read for steps ``0..n_batches-1`` at
      ``hook_name`` (default ``sae.cfg.hook_name``, or the source's only hook).
      Rows move to the SAE's device and dtype.
    - ``model`` + ``tokens`` ``[batch, pos]`` (and optional ``attention_mask``):
      mean next-token loss clean, with the SAE spliced in at the hook, and with
      the hook zero-ablated, ``sequences_per_batch`` sequences at a time. Without
      ``activations`` the reconstruction metrics come from the activations of
      that same spliced forward (real tokens only).
    - Transcoders are measured against their target: ``targets`` (row for row with a
      tensor of ``activations``), the source's ``target_hook_name`` batches, or that
      hook in the model, which the splice replaces and the zero-ablation zeroes.
    Raises ``ConfigError`` when neither is given or only one of model/tokens is.
    An SAE none of whose latents fires is flagged in ``notes`` and warned about
    (``CollapseWarning``).
    """
    if (model is None) != (tokens is None):
        raise ConfigError("pass both model= and tokens= to measure the loss, or neither")
    if activations is None and model is None:
        raise ConfigError("evaluate needs activations, or a model and tokens to produce them")
    for what, value in (("n_batches", n_batches), ("rows_per_batch", rows_per_batch),
                        ("sequences_per_batch", sequences_per_batch)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {value}")
    stats = ReconstructionStats(sae.cfg.d_out, sae.cfg.d_sae)
    name = hook_name if hook_name is not None else sae.cfg.hook_name
    if targets is not None and not sae.cfg.is_transcoder:
        raise ConfigError("targets= is for transcoders; an SAE reconstructs its own input")
    if isinstance(activations, Tensor):
        if sae.cfg.is_transcoder and targets is None:
            raise ConfigError(
                f"a transcoder's reconstruction is measured against {sae.cfg.target_hook_name!r}: "
                "pass its activations as targets= (row for row with activations)"
            )
        _add_tensor_rows(sae, stats, activations, targets, rows_per_batch)
    elif activations is not None:
        name = _source_hook(activations, name)
        target = (
            _source_hook(activations, sae.cfg.target_hook_name) if sae.cfg.is_transcoder else name
        )
        _add_source_rows(sae, stats, activations, name, target, n_batches)
    losses: dict[str, float | None] = dict.fromkeys(_CE_FIELDS)
    notes: list[str] = []
    if model is not None and tokens is not None:
        name = resolve_hook_name(sae, model, name)
        from_tokens = stats if activations is None else None
        clean, spliced_loss, zero = _losses(sae, model, name, tokens, attention_mask,
                                            sequences_per_batch, from_tokens)  # fmt: skip
        recovered = _loss_recovered(clean, spliced_loss, zero, notes)
        losses.update(ce_loss_clean=clean, ce_loss_spliced=spliced_loss,
                      ce_loss_zero_ablated=zero, ce_loss_recovered=recovered,
                      ce_loss_increase=spliced_loss - clean)  # fmt: skip
    if stats.rows == 0:
        raise ConfigError("the evaluation set holds no activation rows")
    if stats.dead_fraction() == 1.0:
        notes.append(
            f"all {sae.cfg.d_sae} latents are dead on these {stats.rows} rows (none fired): "
            "the SAE collapsed in training or reads activations of another scale or hook"
        )
        warnings.warn(f"evaluate: {notes[-1]}", CollapseWarning, stacklevel=2)
    return SAEEvaluation(
        hook_name=name,
        rows=stats.rows,
        l0=stats.l0,
        fvu=stats.fvu,
        explained_variance=stats.explained_variance,
        mse=stats.mse,
        dead_fraction=stats.dead_fraction(),
        dense_fraction=stats.dense_fraction(sae.cfg.dense_threshold),
        latent_frequencies=stats.frequencies(),
        notes=tuple(notes),
        **losses,
    )


def _update(
    sae: SparseAutoencoder, stats: ReconstructionStats, rows: Tensor, targets: Tensor | None
) -> None:
    # flatten by the tensor's own width, so the SAE's width check sees a mismatch
    x = rows.reshape(-1, rows.shape[-1]).to(sae.W_enc.device, sae.W_enc.dtype)
    reconstruction, latents = sae(x)
    y = x if targets is None else targets.reshape(-1, targets.shape[-1])
    if y.shape != reconstruction.shape:
        raise ShapeMismatchError(
            f"targets have rows of shape {tuple(y.shape)}, the transcoder reconstructs "
            f"{tuple(reconstruction.shape)} (d_out={sae.cfg.d_out})"
        )
    stats.update(y.to(reconstruction.device, reconstruction.dtype), reconstruction, latents)


def _add_tensor_rows(
    sae: SparseAutoencoder,
    stats: ReconstructionStats,
    activations: Tensor,
    targets: Tensor | None,
    rows_per_batch: int,
) -> None:
    flat = activations.reshape(-1, activations.shape[-1])
    flat_targets = None if targets is None else targets.reshape(-1, targets.shape[-1])
    for start in range(0, flat.shape[0], rows_per_batch):
        part = slice(start, start + rows_per_batch)
        _update(sae, stats, flat[part], None if flat_targets is None else flat_targets[part])


def _source_hook(source: ActivationBatches, hook_name: str) -> str:
    names = tuple(source.hook_names)
    if not hook_name and len(names) == 1:
        return names[0]
    if hook_name not in names:
        raise UnknownHookError(hook_name, names, what="hook name of the activation source")
    return hook_name


def _add_source_rows(
    sae: SparseAutoencoder,
    stats: ReconstructionStats,
    source: ActivationBatches,
    hook_name: str,
    target_hook_name: str,
    n_batches: int,
) -> None:
    scale_of = getattr(source, "scale", None)

    def raw(batch: dict[str, Tensor], name: str) -> Tensor:
        scale = float(scale_of(name)) if callable(scale_of) else 1.0
        return batch[name] / scale if scale != 1.0 else batch[name]

    for step in range(n_batches):
        batch = source.batch(step)
        targets = raw(batch, target_hook_name) if target_hook_name != hook_name else None
        _update(sae, stats, raw(batch, hook_name), targets)


def _losses(
    sae: SparseAutoencoder,
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    attention_mask: Tensor | None,
    sequences_per_batch: int,
    stats: ReconstructionStats | None,
) -> tuple[float, float, float]:
    """Token-weighted mean losses (clean, spliced, zero-ablated) over the same token batches."""
    totals = [0.0, 0.0, 0.0]
    count = 0
    device = model.W_E.device
    for start in range(0, tokens.shape[0], sequences_per_batch):
        part = slice(start, start + sequences_per_batch)
        batch = tokens[part].to(device)
        mask = None if attention_mask is None else attention_mask[part].to(device)
        pairs = _predicted_tokens(batch, mask)
        if pairs == 0:
            continue  # every sequence in the batch is a single real token: nothing to predict
        clean = model(batch, mask, return_type="loss")
        with spliced(sae, model, hook_name, record=stats is not None) as splice:
            spliced_loss = model(batch, mask, return_type="loss")
        if stats is not None:
            _add_spliced_rows(stats, splice, mask)
        replaced = sae.cfg.target_hook_name if sae.cfg.is_transcoder else hook_name
        with model.hooks(fwd_hooks=[(replaced, _zeros)]):
            zero = model(batch, mask, return_type="loss")
        for i, loss in enumerate((clean, spliced_loss, zero)):
            totals[i] += float(loss) * pairs
        count += pairs
    if count == 0:
        raise ConfigError("tokens hold no predicted positions (each needs two real tokens)")
    clean_mean, spliced_mean, zero_mean = (total / count for total in totals)
    return clean_mean, spliced_mean, zero_mean


def _predicted_tokens(tokens: Tensor, mask: Tensor | None) -> int:
    """Positions ``return_type="loss"`` averages over: next-token pairs of real tokens."""
    if mask is None:
        return tokens.shape[0] * (tokens.shape[1] - 1)
    real = mask.bool()
    return int((real[:, 1:] & real[:, :-1]).sum())


def _add_spliced_rows(stats: ReconstructionStats, splice: Splice, mask: Tensor | None) -> None:
    x, latents, reconstruction = splice.replaced, splice.latents, splice.reconstruction
    if x is None or latents is None or reconstruction is None:
        raise ConfigError(f"the hook {splice.hook_name!r} did not fire in the forward")
    if mask is not None and tuple(x.shape[: mask.ndim]) == tuple(mask.shape):
        real = mask.bool().to(x.device)  # padding is not part of the evaluation set
        x, latents, reconstruction = x[real], latents[real], reconstruction[real]
    stats.update(x.reshape(-1, x.shape[-1]), reconstruction.reshape(-1, x.shape[-1]),
                 latents.reshape(-1, latents.shape[-1]))  # fmt: skip


def _zeros(activation: Tensor, point: HookPoint) -> Tensor:
    return torch.zeros_like(activation)


def _loss_recovered(clean: float, spliced_loss: float, zero: float, notes: list[str]) -> float:
    """``(zero - spliced) / (zero - clean)``; NaN (with a note) when the denominator is ~0."""
    gap = zero - clean
    if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(1.0, abs(clean)):
        notes.append(
            f"ce_loss_recovered is NaN: zero-ablating the hook changes the loss by {gap:.3g} "
            "nats, too little to measure a fraction of"
        )
        return float("nan")
    if gap < 0:
        notes.append(
            "zero-ablating the hook lowers the loss, so ce_loss_recovered has no usual meaning"
        )
    return (zero - spliced_loss) / gap
