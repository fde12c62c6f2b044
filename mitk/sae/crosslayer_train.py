"""``train_clt``: train a cross-layer transcoder on every layer's MLP input and output at once.

Each step reads one batch of the source, which holds every layer's input and
MLP output for the same token rows (an ``ActivationStore`` gets them in one
model pass), and minimises

    sum_M ||y_M - y_hat_M||^2  +  w(step) * penalty

with the squared error summed over ``d_model`` and averaged over rows (as
mitk's single-layer losses), ``w`` the sparsity coefficient warmed up over
``sparsity_warmup_fraction`` of the run, and the penalty
``sum_{L,i} ||W_dec[L]_i|| * H(z_Li - theta_Li)`` for JumpReLU (the L0 count,
differentiable through ``mitk.sae.codes.step``), ``sum_{L,i} ||W_dec[L]_i|| * f_Li``
for ReLU, and none for TopK. ``||W_dec[L]_i||`` is latent i's decoder norm over
every layer it writes. JumpReLU and TopK hold that norm at 1 (the gradient
along it is removed and the decoder renormalised after each step, as for
mitk's single-layer SAEs), so for them the weighting is 1 and a latent cannot
lower its penalty by trading encoder scale for decoder scale.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
from dataclasses import dataclass, field
from pathlib import Path
import time
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mitk.checkpoint import (
    CheckpointSchedule,
    save_checkpoint,
)
from mitk.config import TORCH_DTYPES
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae.codes import step as l0_step
from mitk.sae.crosslayer import CrossLayerTranscoder
from mitk.sae.crosslayer_config import CLTConfig
from mitk.sae.metrics import ReconstructionStats
from mitk.sae.run_state import check_finite, restored_run, write_csv_atomically
from mitk.sae.schedule import lr_factor, warmup_factor
from mitk.sae.sources import ActivationSource
from mitk.shapes import Float


@dataclass
class CLTTrainResult:
    """What ``train_clt`` returns: the trained CLT (reading raw activations) and its metrics.

    ``history`` holds one record per ``log_every`` steps: ``step``, ``tokens``,
    ``loss``, ``mse`` (summed over layers), ``sparsity_loss``, ``fvu`` (all layers'
    outputs together), ``l0`` (active latents per row, all layers), ``dead_fraction``
    (latents silent over the window), ``lr``, and per layer ``layer_{L}/mse``,
    ``layer_{L}/fvu``, ``layer_{L}/l0``, ``layer_{L}/dead_fraction``. FVU, L0 and
    dead fractions are over the rows since the previous record.
    """

    clt: CrossLayerTranscoder
    history: list[dict[str, Any]] = field(default_factory=list)


class CLTLossParts(NamedTuple):
    """One batch's CLT loss and its parts; only ``loss`` carries a graph."""

    loss: Float[Tensor, ""]
    errors: Float[Tensor, " n_layers"]
    """Each layer's squared error (summed over ``d_model``, mean over rows)."""
    sparsity: Float[Tensor, ""]
    """The penalty as added to the loss (coefficient and warmup applied)."""
    reconstruction: Float[Tensor, "n_layers batch d_model"]
    latents: Float[Tensor, "n_layers batch d_sae"]


def clt_loss(
    clt: CrossLayerTranscoder,
    x: Float[Tensor, "n_layers batch d_model"],
    y: Float[Tensor, "n_layers batch d_model"],
    sparsity_scale: float = 1.0,
) -> CLTLossParts:
    """The training loss of ``clt`` reading ``x`` and reconstructing ``y`` (see the module doc)."""
    cfg = clt.cfg
    n_rows = x.shape[1]
    pres = [clt.pre_activations(layer, x[layer]) for layer in range(cfg.n_layers)]
    latents = [clt.activate(layer, pre) for layer, pre in enumerate(pres)]
    recon = clt.decode_layers(latents)
    errors = (recon - y).pow(2).sum(-1).mean(-1)
    penalty = x.new_zeros(())
    if cfg.activation != "topk":
        norms = clt.decoder_norms()
        eps = cfg.jumprelu_bandwidth
        for layer, (pre, f) in enumerate(zip(pres, latents, strict=True)):
            counted = l0_step(pre, clt.threshold[layer], eps) if cfg.activation == "jumprelu" else f
            penalty = penalty + (counted * norms[layer]).sum() / n_rows
    sparsity = sparsity_scale * cfg.sparsity_weight * penalty
    stacked = torch.stack(latents)
    return CLTLossParts(errors.sum() + sparsity, errors.detach(), sparsity.detach(),
                        recon.detach(), stacked.detach())  # fmt: skip


def train_clt(
    cfg: CLTConfig,
    source: ActivationSource,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log_csv: str | Path | None = None,
    device: str | torch.device | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CLTTrainResult:
    """Train one cross-layer transcoder on ``source``; returns it (reading raw activations).

    - ``source`` must serve ``cfg.input_hook_name(L)`` and ``cfg.output_hook_name(L)``
      for every layer (e.g. ``ActivationStore(model, hooks, tokens)``: one model pass
      per chunk gives them all), ``d_model`` wide, ``cfg.batch_size`` rows per step.
      A missing hook raises ``ConfigError`` naming it; another width or batch size,
      ``ShapeMismatchError`` / ``ConfigError``.
    - Adam with the SAE trainer's schedule: linear LR warmup and decay, sparsity
      warmup, gradient clipping; ``b_dec`` starts at each layer's mean output on
      the first batch.
    - ``checkpoint_dir``: atomic checkpoints (``mitk.checkpoint``) every
      ``checkpoint_every`` steps, at the first log step ``checkpoint_seconds`` after
      the last, and at the end; ``resume=True`` continues from the last complete one
      and ends bit-identical (on CPU) to an uninterrupted run. A directory holding
      another run is refused unless resuming; so is resuming with another config
      (checkpoint fields aside) or another source.
    - NaN/inf activations or loss raise ``NonFiniteError`` before any weight
      changes; the last checkpoint stays as it was.
    - The source's normalisation scales are folded into the returned CLT
      (``fold_scales_``); metrics (see ``CLTTrainResult``) also go to ``log_csv``.
    """
    _check_source(cfg, source)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is None:
        raise ConfigError("resume=True needs the checkpoint_dir to resume from")
    target = torch.device(device) if device is not None else torch.device("cpu")
    dtype = TORCH_DTYPES[cfg.dtype]
    clt = CrossLayerTranscoder(cfg).to(target)
    optimizer = torch.optim.Adam(clt.parameters(), lr=cfg.peak_lr)
    meta: dict[str, Any] = {"configs": [cfg.to_dict()], "source": source.fingerprint()}
    inputs = [cfg.input_hook_name(layer) for layer in range(cfg.n_layers)]
    outputs = [cfg.output_hook_name(layer) for layer in range(cfg.n_layers)]

    def stacked(batch: dict[str, Tensor], hooks: list[str], step: int) -> Tensor:
        for hook in hooks:
            check_finite(batch[hook], f"activations of {hook!r}", step, directory)
        return torch.stack([batch[hook] for hook in hooks]).to(target, dtype)

    start, history = 0, []
    restored = restored_run(directory, resume, clt, optimizer, meta)
    if restored is not None:
        start, history = restored["step"], restored["history"]
    else:
        with torch.no_grad():
            clt.b_dec.copy_(stacked(source.batch(0), outputs, 0).mean(1))
            if cfg.unit_norm_decoder:
                clt.normalize_decoder_()
    total = cfg.total_steps
    schedule = CheckpointSchedule(cfg.checkpoint_every, cfg.checkpoint_seconds, total, clock)
    window = _Window(cfg)
    bar = tqdm(range(start, total), desc="clt", initial=start, total=total, disable=not progress)
    for step in bar:
        batch = source.batch(step)
        x, y = stacked(batch, inputs, step), stacked(batch, outputs, step)
        optimizer.param_groups[0]["lr"] = cfg.peak_lr * lr_factor(
            step, total, cfg.lr_warmup_fraction, cfg.lr_decay_fraction
        )
        optimizer.zero_grad(set_to_none=True)
        warm = warmup_factor(step, cfg.sparsity_warmup_fraction, total)
        parts = clt_loss(clt, x, y, warm)
        check_finite(parts.loss.detach(), "the CLT's loss", step, directory)
        parts.loss.backward()
        if cfg.unit_norm_decoder:
            clt.remove_parallel_decoder_grad_()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
        optimizer.step()
        if cfg.unit_norm_decoder:
            clt.normalize_decoder_()
        window.update(y, parts)
        done = step + 1
        logged = done % cfg.log_every == 0 or done == total
        if logged:
            history.append(window.record(done, parts, optimizer.param_groups[0]["lr"]))
            window = _Window(cfg)
            bar.set_postfix({k: f"{history[-1][k]:.4g}" for k in ("loss", "l0", "fvu")})
            if log_csv is not None:
                write_csv_atomically(Path(log_csv), history)
        if directory is not None and schedule.due(done, logged):
            save_checkpoint(directory, clt, optimizer, {**meta, "step": done, "history": history})
            schedule.written()
    final = copy.deepcopy(clt).eval()
    final.fold_scales_(
        [1 / source.scale(hook) for hook in inputs], [1 / source.scale(hook) for hook in outputs]
    )
    return CLTTrainResult(final, history)


def _check_source(cfg: CLTConfig, source: ActivationSource) -> None:
    """Refuse a source that lacks a hook the CLT needs, or serves another width or batch."""
    for layer in range(cfg.n_layers):
        for hook in (cfg.input_hook_name(layer), cfg.output_hook_name(layer)):
            if hook not in source.hook_names:
                raise ConfigError(
                    f"the CLT needs hook {hook!r}, which the source does not read (it has "
                    f"{', '.join(source.hook_names)}); give the store every layer's "
                    f"{cfg.input_hook!r} and 'hook_mlp_out'"
                )
            if source.d_in[hook] != cfg.d_model:
                raise ShapeMismatchError(
                    f"the CLT has d_model={cfg.d_model}, the activations of {hook!r} have "
                    f"width {source.d_in[hook]}"
                )
    if source.batch_size != cfg.batch_size:
        raise ConfigError(
            f"config batch_size={cfg.batch_size} differs from the source's {source.batch_size}"
        )


class _Window:
    """Reconstruction statistics since the last record: per layer and all layers together."""

    def __init__(self, cfg: CLTConfig) -> None:
        self.cfg = cfg
        self.layers = [ReconstructionStats(cfg.d_model, cfg.d_sae) for _ in range(cfg.n_layers)]
        self.overall = ReconstructionStats(cfg.n_layers * cfg.d_model, cfg.n_layers * cfg.d_sae)

    @torch.no_grad()
    def update(self, y: Tensor, parts: CLTLossParts) -> None:
        for layer, stats in enumerate(self.layers):
            stats.update(y[layer], parts.reconstruction[layer], parts.latents[layer])
        # rows side by side: FVU over all layers is their summed error over their summed variance
        self.overall.update(_side_by_side(y), _side_by_side(parts.reconstruction),
                            _side_by_side(parts.latents))  # fmt: skip

    def record(self, done: int, parts: CLTLossParts, lr: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": done,
            "tokens": done * self.cfg.batch_size,
            "loss": float(parts.loss.detach()),
            "mse": float(parts.errors.sum()),
            "sparsity_loss": float(parts.sparsity),
            "fvu": self.overall.fvu,
            "l0": self.overall.l0,
            "dead_fraction": self.overall.dead_fraction(),
            "lr": lr,
        }
        for layer, stats in enumerate(self.layers):
            record.update({
                f"layer_{layer}/mse": float(parts.errors[layer]),
                f"layer_{layer}/fvu": stats.fvu,
                f"layer_{layer}/l0": stats.l0,
                f"layer_{layer}/dead_fraction": stats.dead_fraction(),
            })  # fmt: skip
        return record


def _side_by_side(stacked: Tensor) -> Tensor:
    """``[n_layers, batch, d]`` as ``[batch, n_layers * d]``."""
    return stacked.transpose(0, 1).reshape(stacked.shape[1], -1)
