"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier on the peak learning rate at ``step`` (0-based).

    Rises linearly over ``warmup`` steps, then follows a half cosine from 1 down
    to ``floor`` at ``total``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
