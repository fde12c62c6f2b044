"""Probe figures: held-out score per layer for the probe and its controls, with selectivity."""

from __future__ import annotations

from typing import Literal

import plotly.graph_objects as go

from mitk.analysis.probes import ProbeResult
from mitk.errors import ConfigError
from mitk.viz.axes import plotly_text
from mitk.viz.section import Section

ProbeMetric = Literal["accuracy", "roc_auc"]
_LABELS = {"accuracy": "test accuracy", "roc_auc": "test ROC-AUC"}
# (field prefix, trace name, line style): the probe solid, its controls dashed and dotted
_SERIES = (
    ("", "probe", "solid"),
    ("control_", "control task (random labels)", "dash"),
    ("shuffled_", "shuffled inputs", "dot"),
)


def probe_curve(
    result: ProbeResult, metric: ProbeMetric = "accuracy", *, title: str | None = None
) -> go.Figure:
    """Held-out ``metric`` per layer for the probe, the control task and shuffled inputs.

    Layers run left to right in the result's order, labelled by name. With
    ``metric="accuracy"`` a bar per layer shows the selectivity (probe minus
    control task); a dashed line marks chance (0.5).
    """
    if metric not in _LABELS:
        raise ConfigError(f"metric must be one of {sorted(_LABELS)}, not {metric!r}")
    layers = [plotly_text(layer) for layer in result.layers]
    fig = go.Figure()
    if metric == "accuracy":
        fig.add_trace(
            go.Bar(
                x=layers,
                y=result.selectivity.double().cpu().tolist(),
                name="selectivity (probe − control)",
                marker_color="rgba(36, 113, 163, 0.25)",
            )
        )
    for prefix, name, dash in _SERIES:
        values = getattr(result, f"{prefix}{metric}").double().cpu().tolist()
        fig.add_trace(
            go.Scatter(x=layers, y=values, mode="lines+markers", name=name, line={"dash": dash})
        )
    fig.add_hline(y=0.5, line_dash="dash", line_color="grey", annotation_text="chance")
    fig.update_layout(
        title=title or f"Linear probes ({result.kind}): {_LABELS[metric]} per layer",
        xaxis={"title": "layer", "type": "category"},
        yaxis={"title": _LABELS[metric], "range": [0, 1.05]},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def probe_sections(result: ProbeResult) -> list[Section]:
    """The dashboard's sections for a probe result: the accuracy curve and the per-layer table."""
    note = (
        f"{result.kind} probes scored on {result.n_test} held-out rows. The control task "
        "gives random labels (one per group when groups were given) and the shuffled "
        "inputs pair activations with other rows' labels: both should sit near chance. "
        "Selectivity is the probe's accuracy minus the control task's."
    )
    return [
        Section("Linear probes per layer", probe_curve(result), note=note),
        Section("Linear probes per layer (table)", result.to_frame()),
    ]
