"""Automatic circuit discovery, scored for faithfulness.

- ``Circuit``: a set of edges of a model's graph (``graph``: embeddings,
  heads with their q/k/v inputs, MLPs, logits; heads or layers), built by
  hand, saved and loaded as validated JSON, compared, drawn
  (``mitk.viz.circuit_graph``).
- ``faithfulness``: the metric a circuit recovers with every other edge
  ablated (mean, resample or zero), beside a random circuit of its size.
- Discovery, each returning a ``DiscoveryResult`` (circuit + per-edge scores):
  ``eap_ig`` (edge attribution patching with integrated gradients),
  ``acdc`` (iterative pruning by a KL or metric threshold), ``edge_pruning``
  (a learned hard-concrete mask with an L0 penalty).
- ``faithfulness_curve``: the MIB curve over edge fractions, with CPR and CMD.

All of them run one masked forward (``masked.MaskedRun``) with many masks
stacked along the batch.
"""

from mitk.analysis.discovery.acdc import acdc
from mitk.analysis.discovery.circuit import Circuit, CircuitFileError, Edge
from mitk.analysis.discovery.eap import eap_ig
from mitk.analysis.discovery.faithfulness import (
    Faithfulness,
    FaithfulnessCurve,
    faithfulness,
    faithfulness_curve,
)
from mitk.analysis.discovery.graph import EdgeGraph, GraphShape
from mitk.analysis.discovery.masked import Prompts
from mitk.analysis.discovery.pruning import edge_pruning
from mitk.analysis.discovery.result import DiscoveryResult

__all__ = [
    "Circuit",
    "CircuitFileError",
    "DiscoveryResult",
    "Edge",
    "EdgeGraph",
    "Faithfulness",
    "FaithfulnessCurve",
    "GraphShape",
    "Prompts",
    "acdc",
    "eap_ig",
    "edge_pruning",
    "faithfulness",
    "faithfulness_curve",
]
