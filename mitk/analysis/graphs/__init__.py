"""Attribution graphs: the local replacement model of a prompt and the direct effects in it.

- ``attribution_graph(model, transcoders, tokens)``: features, error terms,
  token embeddings and the likeliest logits as nodes, direct effects through
  the frozen replacement model as edges (circuit-tracer's definitions).
- ``prune_graph(graph)`` and ``graph_scores(graph)``: node and edge pruning by
  influence on the logits, and the replacement and completeness scores.
- ``frontend_json`` / ``write_frontend_json``: the pruned graph in circuit-tracer's
  frontend JSON (its viewer and Neuronpedia's open it).
- ``check_intervention``: clamp or ablate features in the real model and set
  the logit changes beside the graph's prediction.
- ``replacement_logits``, ``prompt_state``, ``frozen_forward``: the replacement
  model itself, for checks and interventions.
"""

from mitk.analysis.graphs.attribution import active_features, attribution_graph, salient_logits
from mitk.analysis.graphs.frontend import frontend_json, write_frontend_json
from mitk.analysis.graphs.interventions import InterventionCheck, check_intervention
from mitk.analysis.graphs.nodes import AttributionGraph, GraphNodes
from mitk.analysis.graphs.pruning import (
    GraphPruning,
    GraphScores,
    graph_scores,
    logit_weights,
    node_influence,
    prune_graph,
)
from mitk.analysis.graphs.replacement import (
    FrozenRun,
    PromptState,
    frozen_forward,
    prompt_state,
    replacement_logits,
)
from mitk.analysis.graphs.transcoders import (
    CrossLayer,
    Dictionaries,
    Transcoder,
    TranscoderSet,
    dictionaries,
)

__all__ = [
    "AttributionGraph",
    "CrossLayer",
    "Dictionaries",
    "FrozenRun",
    "GraphNodes",
    "GraphPruning",
    "GraphScores",
    "InterventionCheck",
    "PromptState",
    "Transcoder",
    "TranscoderSet",
    "active_features",
    "attribution_graph",
    "check_intervention",
    "dictionaries",
    "frontend_json",
    "frozen_forward",
    "graph_scores",
    "logit_weights",
    "node_influence",
    "prompt_state",
    "prune_graph",
    "replacement_logits",
    "salient_logits",
    "write_frontend_json",
]
