"""SAEConfig: one validated description of a sparse autoencoder and how to train it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import math
from types import MappingProxyType
from typing import Any, Literal

from mitk.config import JsonConfig, check_choices, check_positive_ints
from mitk.config.field_types import check_types
from mitk.errors import ConfigError

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
DecoderBiasInit = Literal["geometric_median", "mean", "zeros"]
SAEDType = Literal["float32", "float64", "float16", "bfloat16"]


@dataclass(frozen=True)
class SAEConfig(JsonConfig):
    """Shape, architecture and training settings of one sparse autoencoder.

    Frozen, validated on construction, and JSON round-trips (``to_json`` /
    ``from_json``). Fields left at -1 take the architecture's published
    default or a value scaled to the run (see each field; ``peak_lr`` and
    ``dead_window`` resolve them, so ``replace`` rescales). Coefficients assume
    activations normalised to a mean norm of ``sqrt(d_in)``, which every
    activation source does by default.
    """

    d_in: int
    """Width of the activations the SAE reads (last axis of the hook, flattened)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: Architecture = "topk"
    """``relu`` (L1, decoder-norm weighted), ``topk`` (+AuxK), ``batchtopk``, ``jumprelu``,
    ``gated`` (Rajamanoharan et al. 2024) or ``matryoshka_batchtopk`` (nested prefixes)."""
    k: int = 32
    """Active latents per row for ``topk``; average per row for the BatchTopK family."""
    matryoshka_widths: tuple[int, ...] = ()
    """``matryoshka_batchtopk``: increasing prefix widths, the last equal to ``d_sae``; each
    prefix of the dictionary reconstructs on its own. Empty means ``d_sae/8, /4, /2, d_sae``."""
    l1_coefficient: float = -1.0
    """``relu``/``gated``: weight of the penalty sum_i f_i * ||W_dec[i]|| (Anthropic's
    April 2024 recipe, for inputs normalised to mean norm sqrt(d_in)); -1 means 5 for
    ``relu`` and 4 for ``gated`` (``l1_weight``).

    A gated SAE's penalty acts on the gate alone (magnitudes are free), and 5
    left a fifth of a long run's latents silent: 4 recovers the dictionary as
    well as SAELens at the longest budgets of ``bench/sae_defaults.py`` and
    better at the short ones."""
    l0_coefficient: float = -1.0
    """``jumprelu``: weight of the L0 penalty (per row, summed over latents); -1 means
    ``d_in / 16`` (``l0_weight``).

    The squared error sums over ``d_in`` coordinates of inputs normalised to
    squared norm ~``d_in``, so the price of one more active latent must grow
    with ``d_in`` to buy the same FVU. The bandwidth (0.25) and initial
    threshold (1.0) suit normalised inputs, where a row's interference on any
    latent is O(1): thresholds start near where they end, which short runs need
    (they are learnt in log space, slowly). Measured on ground truth in
    ``bench/sae_defaults.py``."""
    jumprelu_bandwidth: float = 0.25
    """``jumprelu``: width of the rectangle kernel of the straight-through estimator."""
    jumprelu_init_threshold: float = 1.0
    """``jumprelu``: initial threshold of every latent."""
    aux_k: int = -1
    """``topk``/``batchtopk``: latents AuxK revives per row; -1 means ``min(d_in // 2, d_sae)``."""
    aux_coefficient: float = 1 / 32
    """``topk``/``batchtopk``: weight of the AuxK dead-latent loss."""
    dead_after_tokens: int = -1
    """A latent that has not fired for this many training rows counts as dead (AuxK, metrics).

    -1 means Gao et al.'s 10M rows, shortened to a tenth of the run (at least one
    batch) so short runs see their dead latents; never longer than the run."""
    resample_every: float = -1.0
    """``relu``/``jumprelu``/``gated``: fraction of the run between resamplings of silent latents
    (``mitk.sae.resample``, Bricken et al. 2023); 0 never resamples; -1 means 0.05
    (``resample_interval``).

    A JumpReLU latent that stops firing gets no gradient to start again; on
    ground truth a long run lost a fifth of its latents that way, and resampling
    found most of the features they had missed (see the module). Gated latents
    whose gate never opens are as stuck. On ``bench/sae_defaults.py``'s grid no
    run of the three got worse, and the long runs gained most."""
    resample_until: float = 0.7
    """Last resampling no later than this fraction of the run, so that resampled latents
    have time to learn before the learning rate decays."""
    resample_after_tokens: int = -1
    """Rows without firing after which a latent is resampled; -1 means a hundredth of
    the run (at least one batch; ``resample_window``)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of rows counts as dense (metrics)."""
    lr: float = -1.0
    """Peak Adam learning rate; -1 scales it with the dictionary size and the input width
    (``default_lr``), twice that for ``relu`` (``LR_SCALE``)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    lr_warmup_fraction: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays linearly to 0."""
    sparsity_warmup_fraction: float = 0.05
    """Fraction of the steps over which the sparsity coefficient rises linearly from 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    batch_size: int = 4096
    """Activation rows per optimiser step (summed over all processes when distributed)."""
    total_tokens: int = 2_000_000
    """Activation rows seen in training; steps = total_tokens // batch_size."""
    seed: int = 0
    """Seeds the initialisation (and nothing else: the data order belongs to the source)."""
    b_dec_init: DecoderBiasInit = "geometric_median"
    """Initial decoder bias, estimated on the first batch."""
    decoder_init_norm: float = -1.0
    """Norm of each initial decoder row; -1 means 1.0 where rows stay unit-norm, else 0.1."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding."""
    hook_name: str = ""
    """Hook point the SAE reads (informational for the SAE; the store selects data by it)."""
    target_hook_name: str = ""
    """Transcoders: the hook whose activations are reconstructed (e.g. the MLP's output);
    empty for an SAE, which reconstructs its own input."""
    d_out: int = -1
    """Width of what is reconstructed; -1 means ``d_in`` (always so for an SAE)."""
    skip_connection: bool = False
    """Skip-transcoders: add a learned linear map ``x W_skip`` of the input to the output."""
    dtype: SAEDType = "float32"
    """Dtype of the parameters."""
    log_every: int = 100
    """Steps between recorded training metrics."""
    checkpoint_every: int = 1000
    """Steps between atomic checkpoints, when a checkpoint directory is given (and at the end)."""
    checkpoint_seconds: float = 300.0
    """Also checkpoint at the first log step this many seconds after the last one (0: off)."""
    collapse_l0_floor: float = 0.1
    """After warm-up, a logged L0 (mean active latents per row) below this counts as collapse."""
    collapse_fvu_ceiling: float = 0.99
    """After warm-up, a logged FVU above this counts as collapse (nothing is reconstructed)."""
    stop_on_collapse: bool = False
    """Stop a collapsed run with ``CollapseError`` instead of warning and going on."""

    def __post_init__(self) -> None:
        # types first, so a JSON "lr": "fast" is a ConfigError naming the field, not a TypeError
        check_types(type(self), {k: v for k, v in vars(self).items() if k not in _CHOICES})
        set_ = object.__setattr__  # frozen: fill the derived defaults once, here
        if self.aux_k == -1 and isinstance(self.d_in, int) and isinstance(self.d_sae, int):
            set_(self, "aux_k", max(1, min(self.d_in // 2, self.d_sae)))
        if self.d_out == -1 and isinstance(self.d_in, int):
            set_(self, "d_out", self.d_in)
        if isinstance(self.matryoshka_widths, list):  # from JSON
            set_(self, "matryoshka_widths", tuple(self.matryoshka_widths))
        matryoshka = self.architecture == "matryoshka_batchtopk"
        if matryoshka and not self.matryoshka_widths and isinstance(self.d_sae, int):
            widths = sorted({max(1, self.d_sae // d) for d in (8, 4, 2, 1)})
            set_(self, "matryoshka_widths", tuple(widths))
        if self.decoder_init_norm == -1.0:
            set_(self, "decoder_init_norm", 1.0 if self.unit_norm_decoder else 0.1)
        self._validate()

    def _validate(self) -> None:
        check_choices(self, _CHOICES)
        check_positive_ints(
            self, ("d_in", "d_sae", "d_out", "k", "aux_k", "batch_size", "total_tokens")
        )
        self._validate_dictionary_shape()
        for name in ("log_every", "checkpoint_every", "dead_after_tokens", "resample_after_tokens"):
            value = getattr(self, name)
            if value <= 0 and not (name.endswith("after_tokens") and value == -1):
                raise ConfigError(
                    f"{name} must be positive (or -1: scaled to the run), got {value!r}"
                )
        if self.dead_after_tokens > self.total_tokens:
            raise ConfigError(
                f"dead_after_tokens={self.dead_after_tokens} is longer than the run "
                f"(total_tokens={self.total_tokens}): no latent could ever count as dead; "
                "leave it at -1 to scale it to the run"
            )
        if self.uses_k and self.k > self.d_sae:
            raise ConfigError(f"k={self.k} exceeds d_sae={self.d_sae}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})"
            )
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if name in ("l0_coefficient", "l1_coefficient") and value == -1.0:
                continue
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("lr", "jumprelu_bandwidth", "jumprelu_init_threshold", "decoder_init_norm"):
            value = getattr(self, name)
            if name == "lr" and value == -1.0:
                continue
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
        for name in ("adam_beta1", "adam_beta2", "dense_threshold"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        self._validate_resampling()
        fractions = ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction",
                     "resample_until")  # fmt: skip
        for name in fractions:
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ConfigError("lr_warmup_fraction + lr_decay_fraction must not exceed 1")

    def _validate_resampling(self) -> None:
        every = self.resample_every
        if not (every == -1.0 or 0 <= every <= 1):
            raise ConfigError(f"resample_every must lie in [0, 1] (or be -1), got {every!r}")
        if every > 0 and self.architecture not in RESAMPLED:
            raise ConfigError(
                f"resample_every={every}: resampling applies to {' and '.join(RESAMPLED)} "
                f"SAEs, not {self.architecture!r} (the TopK families revive latents with AuxK)"
            )

    def _validate_dictionary_shape(self) -> None:
        """Matryoshka prefixes and the transcoder fields agree with the widths."""
        widths = self.matryoshka_widths
        if widths and self.architecture != "matryoshka_batchtopk":
            raise ConfigError(
                "matryoshka_widths applies only to architecture='matryoshka_batchtopk'"
            )
        if widths:
            if not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
                raise ConfigError(f"matryoshka_widths must be integers, got {list(widths)!r}")
            if list(widths) != sorted(set(widths)) or widths[0] < 1 or widths[-1] != self.d_sae:
                raise ConfigError(
                    f"matryoshka_widths must increase strictly from >= 1 and end at "
                    f"d_sae={self.d_sae}, got {list(widths)!r}"
                )
        if not self.is_transcoder:
            if self.d_out != self.d_in:
                raise ConfigError(
                    f"d_out={self.d_out} differs from d_in={self.d_in}: an SAE reconstructs its "
                    "input; set target_hook_name to train a transcoder"
                )
            if self.skip_connection:
                raise ConfigError("skip_connection needs a transcoder (set target_hook_name)")
        elif self.target_hook_name == self.hook_name:
            raise ConfigError(
                f"target_hook_name equals hook_name ({self.hook_name!r}): that is an SAE; "
                "leave target_hook_name empty"
            )

    @property
    def is_transcoder(self) -> bool:
        """True when the dictionary reads one hook and reconstructs another."""
        return bool(self.target_hook_name)

    @property
    def uses_k(self) -> bool:
        """True for the architectures that choose latents by rank (the TopK families)."""
        return self.architecture in ("topk", "batchtopk", "matryoshka_batchtopk")

    @property
    def batch_level_k(self) -> bool:
        """True where ``k`` is an average over the batch (BatchTopK, Matryoshka BatchTopK)."""
        return self.architecture in ("batchtopk", "matryoshka_batchtopk")

    @property
    def unit_norm_decoder(self) -> bool:
        """True where the method keeps decoder rows at unit norm (all but the L1 ReLU SAE).

        The L1 ReLU SAE instead weights its penalty by each row's norm, which
        removes the incentive to shrink latents by growing decoder rows. Gated
        SAEs keep unit rows, as Rajamanoharan et al. do: their auxiliary loss
        decodes through a frozen decoder, so free rows would shrink under the
        penalty with nothing to restore them, and every gate would open.
        """
        return self.architecture != "relu"

    @property
    def peak_lr(self) -> float:
        """The learning rate training uses: ``lr``, or when it is -1 ``default_lr(d_sae, d_in)``
        times the architecture's ``LR_SCALE``, still capped at ``LR_CAP``."""
        if self.lr != -1.0:
            return self.lr
        return min(LR_CAP, default_lr(self.d_sae, self.d_in) * LR_SCALE.get(self.architecture, 1.0))

    @property
    def l1_weight(self) -> float:
        """The L1 penalty weight: ``l1_coefficient``, or 5 (``relu``) / 4 (``gated``) at -1."""
        if self.l1_coefficient != -1.0:
            return self.l1_coefficient
        return 4.0 if self.architecture == "gated" else 5.0

    @property
    def l0_weight(self) -> float:
        """JumpReLU's L0 penalty weight: ``l0_coefficient``, or ``d_in / 16`` when it is -1."""
        return self.d_in / 16 if self.l0_coefficient == -1.0 else self.l0_coefficient

    @property
    def dead_window(self) -> int:
        """Rows without firing after which a latent counts as dead (resolves -1)."""
        if self.dead_after_tokens != -1:
            return self.dead_after_tokens
        return min(DEAD_AFTER_TOKENS, max(self.batch_size, self.total_tokens // 10))

    @property
    def resample_interval(self) -> int:
        """Steps between resamplings of silent latents; 0 when they are never resampled."""
        every = self.resample_every
        if every == -1.0:
            every = 0.05 if self.architecture in RESAMPLED else 0.0
        return max(1, round(every * self.total_steps)) if every > 0 else 0

    @property
    def resample_window(self) -> int:
        """Rows without firing after which a latent is resampled (resolves -1)."""
        if self.resample_after_tokens != -1:
            return self.resample_after_tokens
        return max(self.batch_size, self.total_tokens // 100)

    @property
    def total_steps(self) -> int:
        """Optimiser steps in the run: ``total_tokens // batch_size``."""
        return self.total_tokens // self.batch_size


RESAMPLED = ("relu", "jumprelu", "gated")
"""Architectures whose silent latents ``mitk.sae.resample`` can re-initialise."""
DEAD_AFTER_TOKENS = 10_000_000
"""Gao et al.'s window for dead latents, the default for runs of 100M rows or more."""
LR_REFERENCE = (2e-4, 2**14, 768)
"""Gao et al. (2024): learning rate 2e-4 at 16,384 latents, scaling as ``1/sqrt(d_sae)``;
mitk anchors it at GPT-2 small's width, 768 inputs."""
LR_CAP = 1e-2
"""The largest default learning rate, for tiny dictionaries."""
LR_SCALE: Mapping[str, float] = MappingProxyType({"relu": 2.0})
"""Per-architecture factors on ``default_lr`` (1 where absent).

Measured on ``bench/sae_defaults.py``'s ground truth (with resampling): plain L1 SAEs
kept improving up to about twice the rule's rate (96 inputs, 512 features, 2M rows:
mean max cosine 0.87 at the rule, 0.91 at twice it), where TopK, BatchTopK, JumpReLU and
gated SAEs were at or near their best at the rule itself."""


def default_lr(d_sae: int, d_in: int = LR_REFERENCE[2]) -> float:
    """The learning rate for ``d_sae`` latents over ``d_in`` inputs:
    ``2e-4 * sqrt(2**14 / d_sae) * sqrt(768 / d_in)``, capped at 1e-2.

    Gao et al. ("Scaling and evaluating sparse autoencoders", 2024) fit the best
    learning rate of TopK SAEs as falling with the square root of the number of
    latents; mitk applies the same rule to every architecture (Adam's step size
    per latent is what it controls, whatever picks the active latents). The
    width factor keeps Adam's step the same size relative to the weights: an
    entry of a unit-norm row over ``d_in`` inputs is about ``1/sqrt(d_in)``,
    and Adam moves every entry by about the learning rate, so a narrow input
    needs a larger rate for the same relative step. On ``bench/sae_defaults.py``'s
    grid (24 to 96 inputs) the best TopK rates were 3 to 4 times the
    768-input rule, as the factor predicts (2.8 to 5.7).
    """
    base, at_latents, at_width = LR_REFERENCE
    return min(LR_CAP, base * math.sqrt(at_latents / d_sae) * math.sqrt(at_width / d_in))


_NON_NEGATIVE = ("l1_coefficient", "l0_coefficient", "aux_coefficient", "grad_clip",
                 "checkpoint_seconds", "collapse_l0_floor", "collapse_fvu_ceiling")  # fmt: skip
_CHOICES: dict[str, Any] = {
    "architecture": Architecture,
    "b_dec_init": DecoderBiasInit,
    "dtype": SAEDType,
}
