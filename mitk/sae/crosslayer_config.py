"""CLTConfig: one validated description of a cross-layer transcoder and how to train it."""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Literal

from mitk.config import JsonConfig, check_choices, check_positive_ints
from mitk.config.field_types import check_types
from mitk.errors import ConfigError
from mitk.sae.config import SAEDType, default_lr

CLTActivation = Literal["relu", "jumprelu", "topk"]
CLTInputHook = Literal["hook_resid_mid", "ln2.hook_normalized"]
CLT_OUTPUT_HOOK = "hook_mlp_out"


@dataclass(frozen=True)
class CLTConfig(JsonConfig):
    """Shape, activation and training settings of one cross-layer transcoder (CLT).

    Layer ``L``'s ``d_sae`` latents read ``blocks.L.{input_hook}`` and write
    ``blocks.M.hook_mlp_out`` for every ``M >= L`` (Ameisen et al. 2025). Frozen,
    validated on construction, JSON round-trips; unknown keys are refused.
    Coefficients assume activations normalised to a mean norm of ``sqrt(d_model)``
    per layer, as mitk's activation sources do.
    """

    n_layers: int
    """Layers the CLT spans: the model's ``n_layers``."""
    d_model: int
    """Width of what each layer reads and writes."""
    d_sae: int
    """Latents per layer (the CLT has ``n_layers * d_sae``)."""
    activation: CLTActivation = "jumprelu"
    """``jumprelu`` (learnt per-latent thresholds, L0 penalty), ``topk`` (``k`` per layer
    and row) or ``relu`` (L1 penalty weighted by the latent's total decoder norm)."""
    k: int = 16
    """``topk``: active latents per layer and row."""
    input_hook: CLTInputHook = "hook_resid_mid"
    """What layer L's latents read, after ``blocks.L.``: the residual stream before the MLP
    (circuit-tracer's default) or ln2's output."""
    dtype: SAEDType = "float32"
    seed: int = 0
    # --- training --------------------------------------------------------------------
    batch_size: int = 4096
    """Token rows per optimiser step (each row holds every layer's input and output)."""
    total_tokens: int = 2_000_000
    lr: float = -1.0
    """Peak Adam learning rate; -1 means ``default_lr(n_layers * d_sae)``."""
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.2
    sparsity_coefficient: float = -1.0
    """``jumprelu``: weight of the L0 penalty; ``relu``: of the L1 penalty. -1 means
    ``d_model / 16`` (L0) or 5 (L1), as for mitk's single-layer dictionaries."""
    sparsity_warmup_fraction: float = 0.1
    jumprelu_bandwidth: float = 0.25
    jumprelu_init_threshold: float = 1.0
    decoder_init_norm: float = -1.0
    """Initial norm of each latent's decoder over every layer it writes; -1 means 1.0 where
    training holds it there (``jumprelu``, ``topk``), else 0.1."""
    grad_clip: float = 1.0
    log_every: int = 50
    checkpoint_every: int = 1000
    """Steps between atomic checkpoints, when a checkpoint directory is given (and at the end)."""
    checkpoint_seconds: float = 300.0
    """Also checkpoint at the first log step this many seconds after the last one (0: off)."""

    def __post_init__(self) -> None:
        # types first, so a JSON "lr": "fast" is a ConfigError naming the field
        check_types(type(self), {k: v for k, v in vars(self).items() if k not in _CHOICES})
        check_choices(self, _CHOICES)
        if self.decoder_init_norm == -1.0:  # frozen: fill the derived default once, here
            object.__setattr__(self, "decoder_init_norm", 1.0 if self.unit_norm_decoder else 0.1)
        check_positive_ints(
            self, ("n_layers", "d_model", "d_sae", "k", "batch_size", "total_tokens",
                   "log_every", "checkpoint_every")
        )  # fmt: skip
        if self.activation == "topk" and self.k > self.d_sae:  # k means nothing elsewhere
            raise ConfigError(f"k={self.k} exceeds d_sae={self.d_sae}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})"
            )
        if self.lr != -1.0 and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be finite and > 0 (or -1), got {self.lr!r}")
        weight = self.sparsity_coefficient
        if weight != -1.0 and not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(
                f"sparsity_coefficient must be finite and >= 0 (or -1), got {weight!r}"
            )
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "decoder_init_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
        for name in ("grad_clip", "checkpoint_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ConfigError("lr_warmup_fraction + lr_decay_fraction must not exceed 1")

    def input_hook_name(self, layer: int) -> str:
        """The full hook name layer ``layer``'s latents read."""
        return f"blocks.{layer}.{self.input_hook}"

    def output_hook_name(self, layer: int) -> str:
        """The full hook name of layer ``layer``'s MLP output, which the CLT reconstructs."""
        return f"blocks.{layer}.{CLT_OUTPUT_HOOK}"

    @property
    def peak_lr(self) -> float:
        """``lr``, or ``default_lr(n_layers * d_sae)`` when it is -1."""
        return default_lr(self.n_layers * self.d_sae) if self.lr == -1.0 else self.lr

    @property
    def unit_norm_decoder(self) -> bool:
        """True where training holds each latent's decoder (all its layers) at unit norm.

        So for JumpReLU and TopK, as for mitk's single-layer SAEs: their penalty (L0,
        or none) does not see magnitudes, and a free norm would let a latent trade
        encoder scale for decoder scale. ReLU's L1 is weighted by the decoder norm
        instead, which removes that trade.
        """
        return self.activation != "relu"

    @property
    def sparsity_weight(self) -> float:
        """The penalty weight: ``sparsity_coefficient``, or its default at -1."""
        if self.sparsity_coefficient != -1.0:
            return self.sparsity_coefficient
        return self.d_model / 16 if self.activation == "jumprelu" else 5.0

    @property
    def total_steps(self) -> int:
        """Optimiser steps in the run: ``total_tokens // batch_size``."""
        return self.total_tokens // self.batch_size


_CHOICES: dict[str, Any] = {
    "activation": CLTActivation,
    "input_hook": CLTInputHook,
    "dtype": SAEDType,
}
