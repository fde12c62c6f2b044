"""Sparse-autoencoder training and evaluation figures: curves, the L0–FVU trade-off, density."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any, TypeAlias

import plotly.graph_objects as go
from plotly.subplots import make_subplots
import torch
from torch import Tensor

from mitk.errors import ConfigError
from mitk.sae.evaluate import SAEEvaluation
from mitk.shapes import Float

History: TypeAlias = Sequence[Mapping[str, Any]]
"""``TrainResult.history``: one record per logging step, metrics under ``{hook}/{metric}``."""

TradeoffPoint: TypeAlias = tuple[str, float, float]
"""``(label, l0, fvu)``: one SAE on the L0–FVU plane."""

DEFAULT_CURVES = ("loss", "l0", "fvu", "dead_fraction")


def history_hooks(history: History) -> list[str]:
    """The hook names that have metrics in ``history``, in first-seen order."""
    seen = dict.fromkeys(
        key.rsplit("/", 1)[0] for record in history for key in record if "/" in key
    )
    return list(seen)


def _pick_hook(history: History, hook: str | None) -> str:
    hooks = history_hooks(history)
    if hook is None and len(hooks) == 1:
        return hooks[0]
    if hook is None or hook not in hooks:
        raise ConfigError(f"choose one of the history's hooks {hooks}, got hook={hook!r}")
    return hook


def training_curves(
    history: History,
    hook: str | None = None,
    *,
    metrics: Sequence[str] | None = None,
    x: str = "tokens",
    title: str | None = None,
) -> go.Figure:
    """One panel per metric of ``hook`` over training (``x`` is ``"tokens"`` or ``"step"``).

    ``hook`` may be left out when the history has one SAE. ``metrics`` default
    to those of ``loss``, ``l0``, ``fvu``, ``dead_fraction`` that were logged.
    """
    if not history:
        raise ConfigError("the training history is empty")
    hook = _pick_hook(history, hook)
    logged = {key.rsplit("/", 1)[1] for key in history[0] if key.startswith(f"{hook}/")}
    chosen = [m for m in DEFAULT_CURVES if m in logged] if metrics is None else list(metrics)
    missing = [m for m in chosen if m not in logged]
    if missing or not chosen:
        raise ConfigError(
            f"metrics {missing or chosen} not logged for {hook}; have {sorted(logged)}"
        )
    fig = make_subplots(rows=len(chosen), cols=1, shared_xaxes=True, subplot_titles=chosen)
    steps = [record[x] for record in history]
    for row, metric in enumerate(chosen, start=1):
        values = [record[f"{hook}/{metric}"] for record in history]
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=metric), row=row, col=1)
    fig.update_xaxes(title_text=x, row=len(chosen), col=1)
    fig.update_layout(
        title=title or f"SAE training: {hook}", showlegend=False, height=200 * len(chosen) + 120
    )
    return fig


def tradeoff_point(
    history: History, hook: str | None = None, label: str | None = None
) -> TradeoffPoint:
    """``(label, l0, fvu)`` from the last record of a training history."""
    hook = _pick_hook(history, hook)
    last = history[-1]
    return (label or hook, float(last[f"{hook}/l0"]), float(last[f"{hook}/fvu"]))


def l0_fvu_tradeoff(
    points: Sequence[SAEEvaluation | TradeoffPoint], title: str = "Sparsity vs reconstruction"
) -> go.Figure:
    """L0 (mean active latents) against FVU (fraction of variance unexplained), one point per SAE.

    Each point is an ``SAEEvaluation`` (labelled by its hook) or a
    ``(label, l0, fvu)`` tuple (``tradeoff_point`` makes one from a history).
    Lower-left is better.
    """
    rows = [(p.hook_name, p.l0, p.fvu) if isinstance(p, SAEEvaluation) else p for p in points]
    fig = go.Figure(
        go.Scatter(
            x=[l0 for _, l0, _ in rows],
            y=[fvu for _, _, fvu in rows],
            text=[label for label, _, _ in rows],
            mode="markers+text",
            textposition="top center",
        )
    )
    fig.update_layout(title=title, xaxis_title="L0 (active latents per token)", yaxis_title="FVU")
    return fig


def density_histogram(
    frequencies: Float[Tensor, " d_sae"], bins: int = 40, title: str = "Latent density"
) -> go.Figure:
    """Histogram of log10 firing frequency over latents; latents that never fired are counted aside.

    ``frequencies`` is the fraction of tokens each latent was active on
    (``LatentStatistics.frequency`` or ``SAEEvaluation.latent_frequencies``).
    Bars carry their counts, so the figure needs no browser to be checked.
    """
    freq = frequencies.detach().double().cpu()
    dead = int((freq <= 0).sum())
    alive = freq[freq > 0].log10()
    if alive.numel():
        low, high = float(alive.min()), float(alive.max())
        if math.isclose(low, high):
            low, high = low - 0.5, high + 0.5
        counts, edges = torch.histogram(alive, bins=bins, range=(low, high))
        centres = ((edges[1:] + edges[:-1]) / 2).tolist()
        width = float(edges[1] - edges[0])
    else:
        counts, centres, width = torch.zeros(0), [], 1.0
    fig = go.Figure(
        go.Bar(x=centres, y=counts.long().tolist(), width=width, marker_color="#2471a3")
    )
    fig.add_annotation(
        text=f"{dead} dead latent{'s' if dead != 1 else ''} (never fired, not shown) "
        f"of {freq.numel()}",
        xref="paper",
        yref="paper",
        x=1,
        y=1.08,
        showarrow=False,
        name="dead",
    )
    fig.update_layout(
        title=title, xaxis_title="log10 firing frequency", yaxis_title="latents", bargap=0
    )
    return fig
