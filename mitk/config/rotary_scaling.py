"""RotaryScaling: how a rotary frequency ladder is stretched past its pretraining context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mitk.config.json_config import JsonConfig, check_choices, check_positive_ints
from mitk.errors import ConfigError

RotaryScalingKind = Literal["linear", "dynamic", "yarn", "llama3"]


@dataclass(frozen=True)
class RotaryScaling(JsonConfig):
    """How a rotary frequency ladder is stretched past its pretraining context (HF ``rope_type``).

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides the low
    frequencies by ``factor``, keeps the high ones and blends between
    (``low_freq_factor``/``high_freq_factor``); ``yarn`` blends interpolated and
    original frequencies over a ramp set by ``beta_fast``/``beta_slow`` and
    multiplies cos/sin by ``attention_factor`` (so ``q·k`` by its square);
    ``dynamic`` (NTK) raises the base once a pass's longest position exceeds
    ``original_context``, so its angles depend on the sequence length. mitk
    reads that length from each pass alone; Hugging Face's module remembers the
    longest it has seen (until a pass within ``original_context``), so the two
    agree on any single forward and on a generation, not on a shorter pass run
    after a longer one on the same HF module.
    """

    kind: RotaryScalingKind
    """Which stretching (Hugging Face's ``rope_type``)."""
    factor: float
    """Context-extension factor (> 0)."""
    original_context: int = 0
    """Pretraining context length: ``llama3``/``yarn``'s wavelength thresholds, the length
    past which ``dynamic`` rescales; unused by ``linear`` (0)."""
    low_freq_factor: float = 1.0
    """``llama3``: wavelengths above ``original_context / low_freq_factor`` are divided."""
    high_freq_factor: float = 4.0
    """``llama3``: wavelengths below ``original_context / high_freq_factor`` are kept."""
    beta_fast: float = 32.0
    """``yarn``: rotations over ``original_context`` below which a pair is interpolated fully."""
    beta_slow: float = 1.0
    """``yarn``: rotations above which a pair is kept as it was (extrapolated)."""
    attention_factor: float = 1.0
    """``yarn``: multiplier on cos and sin (a logit scale); 1 for the other kinds."""
    truncate: bool = True
    """``yarn``: round the ramp's ends to whole dimensions, as the reference does."""

    def __post_init__(self) -> None:
        check_choices(self, {"kind": RotaryScalingKind})
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                     "attention_factor"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"rotary scaling {name} must be a positive number, got {value!r}")
        if self.kind != "linear":
            check_positive_ints(self, ("original_context",))
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"llama3 rotary scaling needs high_freq_factor ({self.high_freq_factor}) > "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        if self.kind != "yarn" and self.attention_factor != 1.0:
            raise ConfigError(f"attention_factor applies to yarn scaling only, not {self.kind!r}")
