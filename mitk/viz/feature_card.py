"""A card for one SAE latent: its top-activating contexts and its direct effect on the logits."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mitk.errors import ConfigError
from mitk.sae.features import LatentExamples, LogitEffects
from mitk.viz.axes import plotly_text


def _token_strings(examples: LatentExamples) -> list[list[str]]:
    """Window tokens as plotly text: decoded where a tokenizer was attached, ids otherwise."""
    if examples.str_tokens is not None:
        return [[plotly_text(token) for token in row] for row in examples.str_tokens]
    return [["" if t < 0 else str(t) for t in row] for row in examples.window_tokens.tolist()]


def _context_heatmap(examples: LatentExamples, max_examples: int) -> go.Heatmap:
    n = min(max_examples, examples.window_tokens.shape[0])
    activations = examples.window_activations[:n].detach().double().cpu()
    labels = [
        f"seq {s}, pos {p}"
        for s, p in zip(
            examples.sequences[:n].tolist(), examples.positions[:n].tolist(), strict=True
        )
    ]
    return go.Heatmap(
        z=activations.tolist(),
        x=examples.offsets.tolist(),
        y=labels,
        text=_token_strings(examples)[:n],
        texttemplate="%{text}",
        colorscale="Oranges",
        zmin=0,
        colorbar={"title": "activation", "x": 0.62},
        hovertemplate="%{y}, offset %{x}: %{text}<br>activation %{z:.3f}<extra></extra>",
        name="contexts",
    )


def _effect_bars(effects: LogitEffects) -> go.Bar:
    """Top (most promoted) then bottom (most suppressed) tokens, biggest effect at the top."""
    k = effects.top_tokens.shape[0]
    top = effects.top_str_tokens or [str(t) for t in effects.top_tokens.tolist()]
    bottom = effects.bottom_str_tokens or [str(t) for t in effects.bottom_tokens.tolist()]
    values = effects.top_values.tolist() + effects.bottom_values.tolist()[::-1]
    return go.Bar(
        x=values,
        y=list(range(2 * k)),
        orientation="h",
        text=[plotly_text(token) for token in [*top, *bottom[::-1]]],
        textposition="auto",
        marker_color=["#2471a3" if v >= 0 else "#c0392b" for v in values],
        name="logit effects",
    )


def feature_card(
    examples: LatentExamples,
    effects: LogitEffects | None = None,
    *,
    max_examples: int = 10,
    title: str | None = None,
) -> go.Figure:
    """Top-activating contexts (tokens shaded by activation) beside the latent's logit effects.

    ``examples`` is ``LatentStatistics.examples(latent)``: row ``e`` is one
    context, column offset 0 the token where the latent peaked. ``effects``
    (``logit_effects(sae, model, latent)``) adds bars of the tokens its decoder
    direction promotes and suppresses most.
    """
    if effects is not None and effects.latent != examples.latent:
        raise ConfigError(
            f"examples are for latent {examples.latent}, effects for {effects.latent}"
        )
    cols = 2 if effects is not None else 1
    fig = make_subplots(
        rows=1,
        cols=cols,
        column_widths=[0.7, 0.3][:cols],
        horizontal_spacing=0.2,
        subplot_titles=["top-activating contexts", "logit effect per unit activation"][:cols],
    )
    fig.add_trace(_context_heatmap(examples, max_examples), row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="offset from the peak token", row=1, col=1)
    if effects is not None:
        fig.add_trace(_effect_bars(effects), row=1, col=2)
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=2)
    n_rows = min(max_examples, examples.window_tokens.shape[0])
    fig.update_layout(
        title=title or f"Latent {examples.latent}",
        showlegend=False,
        height=max(320, 32 * n_rows + 160),
    )
    return fig
