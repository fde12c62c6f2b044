"""A pruned graph in circuit-tracer's frontend JSON, which its viewer and Neuronpedia's open.

Follows ``circuit_tracer/frontend/graph_models.py`` (``schema_version`` 1):
``metadata``, ``qParams``, ``nodes`` (feature, error, embedding and logit
nodes with circuit-tracer's ids) and ``links`` (``source``, ``target``,
``weight``: the direct effect of source on target). As circuit-tracer does,
only nodes and edges that survive pruning are written, and of the feature and
error nodes only those an edge touches.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path
from typing import Any

from mitk.analysis.graphs.nodes import AttributionGraph
from mitk.analysis.graphs.pruning import prune_graph
from mitk.atomic import atomic_write

SCHEMA_VERSION = 1


def frontend_json(
    graph: AttributionGraph,
    *,
    slug: str = "mitk-graph",
    scan: str = "mitk",
    prompt: str = "",
    token_strings: Sequence[str] | None = None,
    vocab_strings: Sequence[str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """The graph, pruned with these thresholds, as circuit-tracer's frontend reads it.

    ``token_strings`` are the prompt's tokens as text (default: their ids),
    ``vocab_strings`` a token-id -> text table for the logit labels (default:
    ids); ``scan`` names the transcoders (Neuronpedia looks features up by it).
    """
    texts = token_texts(graph, token_strings)
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    influence = pruned.cumulative_scores.tolist()
    made: dict[int, dict[str, Any]] = {}
    for index in pruned.node_mask.nonzero()[:, 0].tolist():
        made[index] = _node(graph, index, influence[index], vocab_strings)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": made[s]["node_id"], "target": made[t]["node_id"], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in made and t in made
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    kept = [
        node
        for node in made.values()
        if node["node_id"] in linked or node["feature_type"] in ("embedding", "logit")
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": texts,
            "prompt": prompt or "".join(texts),
            "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": kept,
        "links": links,
    }


def token_texts(graph: AttributionGraph, token_strings: Sequence[str] | None) -> list[str]:
    """The prompt's tokens as text: ``token_strings`` (one per token, checked), else their ids."""
    tokens = graph.nodes.tokens.tolist()
    if token_strings is not None and len(token_strings) != len(tokens):
        raise ValueError(
            f"token_strings has {len(token_strings)} entries, the prompt {len(tokens)} tokens"
        )
    return list(token_strings) if token_strings is not None else [str(t) for t in tokens]


def write_frontend_json(graph: AttributionGraph, path: str | Path, **options: Any) -> Path:
    """Write ``frontend_json(graph, **options)`` to ``path`` (atomically); returns the path."""
    text = json.dumps(frontend_json(graph, **options), indent=2)
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def _node(
    graph: AttributionGraph, index: int, influence: float, vocab: Sequence[str] | None
) -> dict[str, Any]:
    nodes = graph.nodes
    if index < nodes.n_features:
        layer, pos, feature = nodes.features[index].tolist()
        return _entry(
            node_id=f"{layer}_{feature}_{pos}", feature=_cantor(layer, feature), layer=str(layer),
            ctx_idx=pos, feature_type="cross layer transcoder",
            jsNodeId=f"{layer}_{feature}-0", influence=influence,
            activation=float(nodes.activations[index]),
        )  # fmt: skip
    if index < nodes.token_start:
        layer, pos = divmod(index - nodes.error_start, nodes.n_pos)
        return _entry(
            node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
            feature_type="mlp reconstruction error", jsNodeId=f"{layer}_-1-{pos}",
            influence=influence,
        )  # fmt: skip
    if index < nodes.logit_start:
        pos = index - nodes.token_start
        token = int(nodes.tokens[pos])
        return _entry(
            node_id=f"E_{token}_{pos}", feature=pos, layer="E", ctx_idx=pos,
            feature_type="embedding", jsNodeId=f"E_{token}-{pos}", influence=influence,
        )  # fmt: skip
    rank = index - nodes.logit_start
    token = int(nodes.logit_tokens[rank])
    prob = float(nodes.logit_probabilities[rank])
    text = vocab[token] if vocab is not None else str(token)
    layer = str(nodes.n_layers + 1)
    return _entry(
        node_id=f"{layer}_{token}_{nodes.n_pos - 1}", feature=token, layer=layer,
        ctx_idx=nodes.n_pos - 1, feature_type="logit", token_prob=prob,
        is_target_logit=rank == 0, jsNodeId=f"L_{token}-{nodes.n_pos - 1}",
        clerp=f'Output "{text}" (p={prob:.3f})',
    )  # fmt: skip


def _cantor(x: int, y: int) -> int:
    """Circuit-tracer's one number for (layer, feature): the Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def _entry(**fields: Any) -> dict[str, Any]:
    """A node with circuit-tracer's defaults for the fields not given."""
    node: dict[str, Any] = {
        "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
        "clerp": "", "influence": None, "activation": None,
    }  # fmt: skip
    node.update(fields)
    return node
