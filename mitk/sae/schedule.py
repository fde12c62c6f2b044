"""Step schedules shared by the SAE and CLT trainers: LR warmup and decay, coefficient warmup."""

from __future__ import annotations


def warmup_factor(step: int, fraction: float, total_steps: int) -> float:
    """Linear rise from ``1 / steps`` to 1 over the first ``fraction`` of ``total_steps``."""
    steps = round(fraction * total_steps)
    return min(1.0, (step + 1) / steps) if steps > 0 else 1.0


def lr_factor(step: int, total_steps: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warmup from 0, flat, then linear decay to 0 over the last ``decay_fraction``."""
    factor = warmup_factor(step, warmup_fraction, total_steps)
    decay = round(decay_fraction * total_steps)
    if decay > 0 and step >= total_steps - decay:
        factor = min(factor, (total_steps - step) / decay)
    return factor
