"""Collapse: a run whose dictionary stopped reconstructing, caught from its logged metrics.

Two signs, checked at each log step once warm-up is over: L0 below
``collapse_l0_floor`` (the latents stopped firing), or FVU above
``collapse_fvu_ceiling`` on two log steps in a row (the reconstruction explains
nothing). The verdict is a pure function of the metric history, so a resumed run
warns exactly where an uninterrupted one would, and only once per dictionary.
"""

from __future__ import annotations

from typing import Any

from mitk.errors import MitkError
from mitk.sae.config import SAEConfig

FLAG = "collapsed"
"""History key suffix: ``{label}/collapsed`` is 1.0 from the first collapsed log step on."""


class CollapseError(MitkError, RuntimeError):
    """``stop_on_collapse=True`` and the run collapsed; the message says what to change."""


class CollapseWarning(UserWarning):
    """The run collapsed and goes on (``stop_on_collapse=False``)."""


def warmup_steps(cfg: SAEConfig) -> int:
    """Steps before collapse is judged: the lr and sparsity warm-ups, and a tenth of the run.

    The tenth keeps the first steps, where FVU above 1 is just the initialisation, out
    of the verdict even in runs configured without warm-up.
    """
    fractions = (cfg.lr_warmup_fraction, cfg.sparsity_warmup_fraction, 0.1)
    return max(round(f * cfg.total_steps) for f in fractions)


def collapse_verdict(
    cfg: SAEConfig, label: str, history: list[dict[str, Any]], input_scale: float
) -> str | None:
    """Why the run collapsed at the last record of ``history``, or None if it has not.

    ``history``'s last record must not hold the flag yet; earlier ones may
    (a run that already collapsed is not judged again). ``input_scale`` is the
    factor the source multiplied activations by (1.0: not normalised).
    """
    if any(record.get(f"{label}/{FLAG}") for record in history[:-1]):
        return None
    last = history[-1]
    if last["step"] <= warmup_steps(cfg):
        return None
    l0 = last[f"{label}/l0"]
    if l0 < cfg.collapse_l0_floor:
        return f"{label}: L0 fell to {l0:.3g} at step {last['step']}; " + _l0_cause(
            cfg, input_scale
        )
    previous = history[-2] if len(history) > 1 else None
    fvus = [r[f"{label}/fvu"] for r in (previous, last) if r and r["step"] > warmup_steps(cfg)]
    if len(fvus) == 2 and min(fvus) > cfg.collapse_fvu_ceiling:
        return (
            f"{label}: FVU stayed at {fvus[-1]:.3f} (above {cfg.collapse_fvu_ceiling}) through "
            f"step {last['step']}, so the dictionary reconstructs nothing; "
            + (_l0_cause(cfg, input_scale) if _starved(cfg, l0) else _fvu_cause(cfg, input_scale))
        )
    return None


def _starved(cfg: SAEConfig, l0: float) -> bool:
    """Fewer than one latent per row under a penalty: the sparsity term won.

    Where silent latents are resampled, the L0 of a starved run counts latents
    that fire for a few steps after each resampling and fall silent again, so
    any L0 with an FVU that stays near 1 is read as the penalty winning.
    """
    return not cfg.uses_k and (l0 < 1.0 or cfg.resample_interval > 0)


def _l0_cause(cfg: SAEConfig, input_scale: float) -> str:
    scale = _scale_hint(input_scale)
    if cfg.architecture in ("relu", "gated"):
        return (
            f"the L1 penalty (l1_coefficient={cfg.l1_weight:g}) outweighs the "
            f"reconstruction at this activation scale{scale}: lower l1_coefficient"
        )
    if cfg.architecture == "jumprelu":
        return (
            f"the L0 penalty (l0_coefficient={cfg.l0_weight:g}) or the thresholds "
            f"(jumprelu_init_threshold={cfg.jumprelu_init_threshold:g}) are too large for this "
            f"activation scale{scale}: lower them"
        )
    return f"the encoder's pre-activations went negative (lr={cfg.peak_lr:.3g} too high?)"


def _fvu_cause(cfg: SAEConfig, input_scale: float) -> str:
    return (
        f"the learning rate (lr={cfg.peak_lr:.3g}) may be too high, or the sparsity too strict "
        f"for this data{_scale_hint(input_scale)}"
    )


def _scale_hint(input_scale: float) -> str:
    if input_scale == 1.0:
        return " (the source does not normalise activations; the defaults assume it does)"
    return ""
