"""Causal interventions: activation, path, attribution and edge patching; ablations; metrics.

Uncertainty over prompts (bootstrap intervals, sign-flip tests) lives in ``uncertainty``.
"""

from mitk.analysis.patching.ablation import mean_ablation, resample_ablation, zero_ablation
from mitk.analysis.patching.activation import PatchResult, activation_patch
from mitk.analysis.patching.attribution import attribution_patch, compare_with_activation_patching
from mitk.analysis.patching.edges import EdgeScores, edge_attribution_patch
from mitk.analysis.patching.metrics import (
    KLToClean,
    LogitDiff,
    LogProb,
    PositionMetric,
    Prob,
    kl_to_clean,
    log_prob,
    logit_diff,
    prob,
)
from mitk.analysis.patching.path import PathPatchResult, path_patch, path_patch_heads
from mitk.analysis.patching.sites import ALL_GRANULARITIES, GRANULARITIES, SITES, Site
from mitk.analysis.patching.uncertainty import (
    benjamini_hochberg,
    bootstrap_interval,
    cell_table,
    sign_flip_test,
)

__all__ = [
    "ALL_GRANULARITIES",
    "GRANULARITIES",
    "SITES",
    "EdgeScores",
    "KLToClean",
    "LogProb",
    "LogitDiff",
    "PatchResult",
    "PathPatchResult",
    "PositionMetric",
    "Prob",
    "Site",
    "activation_patch",
    "attribution_patch",
    "benjamini_hochberg",
    "bootstrap_interval",
    "cell_table",
    "compare_with_activation_patching",
    "edge_attribution_patch",
    "kl_to_clean",
    "log_prob",
    "logit_diff",
    "mean_ablation",
    "path_patch",
    "path_patch_heads",
    "prob",
    "resample_ablation",
    "sign_flip_test",
    "zero_ablation",
]
