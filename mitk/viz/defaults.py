"""Default figures for each result type mitk produces, so a dashboard can take results directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mitk.analysis.dla import Attribution
from mitk.analysis.lens import LogitLens
from mitk.analysis.patching import PatchResult
from mitk.analysis.probes import ProbeResult
from mitk.errors import MitkError
from mitk.model.factored_matrix import FactoredMatrix
from mitk.sae.evaluate import SAEEvaluation
from mitk.sae.features import LatentStatistics
from mitk.sae.trainer import TrainResult
from mitk.viz.axes import HEAD_LABEL
from mitk.viz.circuits import composition_heatmap, eigenvalue_scatter
from mitk.viz.dla import dla_bar, dla_head_heatmap, logit_lens_heatmap
from mitk.viz.feature_card import feature_card
from mitk.viz.patching import min_prompts, patching_curve, patching_facets, patching_heatmap
from mitk.viz.probes import probe_sections
from mitk.viz.sae import density_histogram, history_hooks, training_curves
from mitk.viz.section import Section

CARDS_PER_STATISTICS = 3  # feature cards shown for a LatentStatistics: its strongest latents


class UnsupportedResultError(MitkError, TypeError):
    """``figures_for`` (or a dashboard item) got an object it has no default figure for."""


def _patching(result: PatchResult) -> list[Section]:
    where = f"{result.site} per {result.per}"
    if result.per == "head_pos":
        return [Section(f"Activation patching: {where}", patching_facets(result))]
    curve: list[Section] = []
    if result.per == "layer" and result.per_prompt.shape[0] >= min_prompts(0.05):
        curve = [
            Section(
                f"Activation patching: {where} (recovery with 95% intervals)",
                patching_curve(result),
                note="Error bars: bootstrap over prompts. Hollow markers: not significantly "
                "different from the unpatched run (sign-flip test, Benjamini–Hochberg at 0.05).",
            )
        ]
    return [
        *curve,
        Section(
            f"Activation patching: {where} (recovery)",
            patching_heatmap(result),
            note="1 = patching restores the clean metric, 0 = no change from corrupted.",
        ),
        Section(f"Activation patching: {where} (metric)", patching_heatmap(result, False)),
    ]


def _attribution(result: Attribution) -> list[Section]:
    note = f"Mean over {result.values.shape[1]} prompts."
    sections = [Section("Direct logit attribution", dla_bar(result), note=note)]
    if any(HEAD_LABEL.match(label) for label in result.labels):
        sections.append(
            Section("Direct logit attribution per head", dla_head_heatmap(result), note=note)
        )
    return sections


def _lens(result: LogitLens) -> list[Section]:
    # with no answer given, follow the model's own final prediction back through the layers
    final_top = result.logits[-1].argmax(-1)
    figure = logit_lens_heatmap(result, final_top, prompt=None, metric="rank")
    return [
        Section(
            "Logit lens",
            figure,
            note="Rank (0 = top) of the model's final top "
            "prediction at each position, read after each layer; mean over prompts.",
        )
    ]


def _statistics(result: LatentStatistics) -> list[Section]:
    sections = [Section(f"Latent density: {result.hook_name}", density_histogram(result.frequency))]
    strongest = result.max_activation.argsort(descending=True)[:CARDS_PER_STATISTICS]
    for latent in strongest.tolist():
        if result.max_activation[latent] > 0:
            sections.append(Section(f"Latent {latent}", feature_card(result.examples(latent))))
    return sections


def _evaluation(result: SAEEvaluation) -> list[Section]:
    return [
        Section(
            f"SAE evaluation: {result.hook_name}", result.to_frame(), note="; ".join(result.notes)
        ),
        Section(
            f"Latent density: {result.hook_name}", density_histogram(result.latent_frequencies)
        ),
    ]


def _training(result: TrainResult) -> list[Section]:
    return [
        Section(f"SAE training: {hook}", training_curves(result.history, hook))
        for hook in history_hooks(result.history)
    ]


def _eigenvalues(result: FactoredMatrix) -> list[Section]:
    return [
        Section(
            "Circuit eigenvalues",
            eigenvalue_scatter(result),
            note="Each head's eigenvalues, scaled by its largest |λ|; the legend gives "
            "Σλ/Σ|λ| (near +1: a full OV circuit that copies tokens).",
        )
    ]


# result type -> its default sections; the types are unrelated, so the order does not matter
_DEFAULTS: dict[type, Callable[[Any], list[Section]]] = {
    PatchResult: _patching,
    ProbeResult: probe_sections,
    Attribution: _attribution,
    LogitLens: _lens,
    TrainResult: _training,
    SAEEvaluation: _evaluation,
    LatentStatistics: _statistics,
    FactoredMatrix: _eigenvalues,
}


def figures_for(result: Any) -> list[Section]:
    """The default sections for a result object; raises ``UnsupportedResultError`` otherwise.

    Known: ``PatchResult``, ``ProbeResult``, ``Attribution``, ``LogitLens``, ``TrainResult``,
    ``SAEEvaluation``, ``LatentStatistics``, a ``FactoredMatrix`` circuit
    (eigenvalues) and a ``[layer, head, layer, head]`` tensor of composition scores.
    """
    for kind, sections in _DEFAULTS.items():
        if isinstance(result, kind):
            return sections(result)
    if isinstance(result, torch.Tensor) and result.ndim == 4:
        return [Section("Composition scores", composition_heatmap(result))]
    raise UnsupportedResultError(
        f"no default figure for {type(result).__name__}; pass a Section, figure, DataFrame or "
        "text, or build a figure with mitk.viz"
    )
