"""RotaryScaling: how a rotary frequency ladder is stretched past its pretraining context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mitk.config.json_config import JsonConfig, check_choices, check_positive_ints
from mitk.errors import ConfigError

RotaryScalingKind = Literal["linear", "dynamic", "yarn", "llama3", "longrope"]


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

    ``longrope`` (Phi-3) divides each frequency by its own factor: by
    ``short_factor`` while a pass's longest position stays within
    ``original_context``, by ``long_factor`` past it, and multiplies cos/sin by
    ``attention_factor``. Hugging Face chooses afresh on every pass (nothing is
    remembered), and so does mitk. A cached generation that passes
    ``original_context`` holds keys rotated with the short factors; with
    ``recompute_at_switch`` mitk's ``generate`` then reruns the whole sequence,
    as Hugging Face's Phi-3 ``generate`` does (its LLaMA keeps the cached keys).
    """

    kind: RotaryScalingKind
    """Which stretching (Hugging Face's ``rope_type``)."""
    factor: float
    """Context-extension factor (> 0). ``longrope`` scales by its per-pair lists instead;
    there it only sets the default ``attention_factor`` (HF's factor defaults to
    ``max_position_embeddings / original_context``)."""
    original_context: int = 0
    """Pretraining context length: ``llama3``/``yarn``'s wavelength thresholds, the length
    past which ``dynamic`` rescales and ``longrope`` takes its long factors; unused by
    ``linear`` (0)."""
    low_freq_factor: float = 1.0
    """``llama3``: wavelengths above ``original_context / low_freq_factor`` are divided."""
    high_freq_factor: float = 4.0
    """``llama3``: wavelengths below ``original_context / high_freq_factor`` are kept."""
    beta_fast: float = 32.0
    """``yarn``: rotations over ``original_context`` below which a pair is interpolated fully."""
    beta_slow: float = 1.0
    """``yarn``: rotations above which a pair is kept as it was (extrapolated)."""
    attention_factor: float = 1.0
    """``yarn``/``longrope``: multiplier on cos and sin (a logit scale); 1 for the other kinds."""
    truncate: bool = True
    """``yarn``: round the ramp's ends to whole dimensions, as the reference does."""
    short_factor: list[float] | None = None
    """``longrope``: per-pair divisors (``rotary_dim / 2`` positive numbers) within
    ``original_context``; None for the other kinds."""
    long_factor: list[float] | None = None
    """``longrope``: per-pair divisors past ``original_context``; None for the other kinds."""
    recompute_at_switch: bool = True
    """``longrope``: ``generate`` reruns the sequence once it first passes ``original_context``,
    so no cached key keeps the short factors (HF's Phi-3 does; False: as its LLaMA)."""

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
        if self.kind not in ("yarn", "longrope") and self.attention_factor != 1.0:
            raise ConfigError(
                f"attention_factor applies to yarn and longrope scaling only, not {self.kind!r}"
            )
        self._check_per_pair_factors()

    def _check_per_pair_factors(self) -> None:
        """longrope needs two equally long lists of positive numbers; the other kinds none."""
        pairs = {"short_factor": self.short_factor, "long_factor": self.long_factor}
        if self.kind != "longrope":
            given = [name for name, value in pairs.items() if value is not None]
            if given or not self.recompute_at_switch:
                name = ", ".join(given) or "recompute_at_switch"
                raise ConfigError(f"{name} applies to longrope scaling only, not {self.kind!r}")
            return
        for name, value in pairs.items():
            if (
                not isinstance(value, list)
                or not value
                or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value
                )
            ):
                raise ConfigError(
                    f"longrope rotary scaling {name} must be a non-empty list of positive "
                    f"numbers, got {value!r}"
                )
        if len(pairs["short_factor"] or ()) != len(pairs["long_factor"] or ()):
            raise ConfigError(
                f"longrope short_factor and long_factor must be equally long, got "
                f"{len(self.short_factor or ())} and {len(self.long_factor or ())}"
            )

    def check_rotary_dim(self, rotary_dim: int) -> None:
        """``ConfigError`` unless longrope's per-pair factors number ``rotary_dim / 2``."""
        if self.short_factor is not None and len(self.short_factor) != rotary_dim // 2:
            raise ConfigError(
                f"longrope short_factor/long_factor need rotary_dim / 2 = {rotary_dim // 2} "
                f"entries (one per rotated pair), got {len(self.short_factor)}"
            )
