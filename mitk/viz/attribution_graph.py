"""An attribution graph as one self-contained HTML page: nodes by layer and position, edges.

Rows are layers (token embeddings at the bottom, logits at the top), columns
the prompt's positions, labelled with its tokens. Only the pruned graph is
drawn (``prune_graph``'s nodes and edges, as the frontend JSON holds). A
node's area follows its influence on the logits (a logit's, its
probability), a feature's shade its activation; an edge's colour is its
sign (blue raises the target, red lowers it), its width ``|weight|``.
Hovering a node shows its token, layer, position, feature and activation;
clicking it lists its strongest inputs and outputs and, where the caller
passed them, the feature's top examples and logit effects.

The graph travels as JSON inside the page (``<script type="application/json"
id="mitk-graph-data">``) and a few lines of inline JavaScript draw it as
SVG: the page loads nothing, and the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import html
from importlib.metadata import PackageNotFoundError, version
import json
from pathlib import Path
from typing import Any

import torch

from mitk.analysis.graphs import AttributionGraph, node_influence, prune_graph
from mitk.analysis.graphs.frontend import token_texts
from mitk.atomic import atomic_write_text

FeatureKey = tuple[int, int]
"""A transcoder feature: ``(layer, feature index)``."""
FeatureRows = Mapping[FeatureKey, Sequence[tuple[str, float]]]
"""Per feature, ``(text, value)`` rows: contexts and activations, or tokens and logit effects."""

DATA_ID = "mitk-graph-data"
"""The id of the script element that holds the page's graph JSON."""
_SIGNIFICANT = 6  # digits kept of each number in the page: enough to read, half the bytes


def graph_viewer_html(
    graph: AttributionGraph,
    *,
    token_strings: Sequence[str] | None = None,
    vocab_strings: Sequence[str] | Mapping[int, str] | None = None,
    examples: FeatureRows | None = None,
    logit_effects: FeatureRows | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    title: str = "Attribution graph",
    header: Mapping[str, str] | None = None,
) -> str:
    """The viewer page of ``graph``, pruned with these thresholds, as an HTML string.

    - ``token_strings``: the prompt's tokens as text (column labels; default: ids).
    - ``vocab_strings``: token id -> text for the logit nodes (default: ids).
    - ``examples``: ``{(layer, feature): [(context, activation), ...]}``, shown
      when a feature is clicked; ``logit_effects`` likewise ``[(token, effect)]``
      (e.g. the decoder row through the unembedding). Entries for features the
      pruned graph does not hold are left out.
    - ``header``: what produced the graph (model, transcoders, scores), shown
      as a table above it, after the prompt and the counts.
    """
    data = graph_viewer_data(
        graph, token_strings=token_strings, vocab_strings=vocab_strings, examples=examples,
        logit_effects=logit_effects, node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )  # fmt: skip
    shown = {
        "prompt": "".join(data["tokens"]),
        "nodes shown": f"{len(data['nodes'])} of {graph.nodes.n_nodes}",
        "edges shown": str(len(data["edges"])),
        "pruning": f"node threshold {node_threshold}, edge threshold {edge_threshold}",
        **(header or {}),
    }
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in shown.items()
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table class='header'>{rows}</table>"
        f"<p class='note'>{_LEGEND}</p>"
        "<div id='graph-frame'><svg id='graph' role='img' aria-label='attribution graph'>"
        "</svg></div><div id='tooltip' hidden></div>"
        "<section id='details'><p class='note'>Click a node for its inputs, outputs and, for a "
        "feature, its top examples and logit effects.</p></section>"
        f"<script type='application/json' id='{DATA_ID}'>{_script_json(data)}</script>"
        f"<script>{_JS}</script>"
        f"<footer>Written by mitk {html.escape(_mitk_version())}.</footer></body></html>\n"
    )


def graph_viewer(path: str | Path, graph: AttributionGraph, **options: Any) -> Path:
    """Write ``graph_viewer_html(graph, **options)`` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, graph_viewer_html(graph, **options))


def graph_viewer_data(
    graph: AttributionGraph,
    *,
    token_strings: Sequence[str] | None = None,
    vocab_strings: Sequence[str] | Mapping[int, str] | None = None,
    examples: FeatureRows | None = None,
    logit_effects: FeatureRows | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """What the page embeds: ``tokens``, ``rows``, ``nodes`` (with layout), ``edges``, ``features``.

    Each node carries its graph index (``id``), ``kind``, ``layer`` (-1 for
    tokens, ``n_layers`` for logits), ``pos``, ``feature`` (-1 unless a feature),
    ``label``, ``activation``, ``probability``, ``influence``, its ``row``
    (0 = tokens) and ``x`` (in node widths); each edge ``source``, ``target``
    (graph indices) and ``weight``, weakest first so strong edges draw on top.
    """
    nodes = graph.nodes
    texts = token_texts(graph, token_strings)
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    influence = node_influence(graph).tolist()
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    made = [_node(graph, i, influence[i], texts, vocab_strings) for i in kept]
    _lay_out(made)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    order = torch.sort(weights.abs(), stable=True).indices.tolist()
    pairs = list(zip(sources.tolist(), targets.tolist(), weights.tolist(), strict=True))
    edges = [{"source": pairs[i][0], "target": pairs[i][1], "weight": _round(pairs[i][2])}
             for i in order]  # fmt: skip
    shown = sorted({(n["layer"], n["feature"]) for n in made if n["kind"] == "feature"})
    features: dict[str, dict[str, list[list[Any]]]] = {}
    for layer, feature in shown:
        entry = {
            name: [[str(text), _round(float(value))] for text, value in given[(layer, feature)]]
            for name, given in (("examples", examples), ("logit_effects", logit_effects))
            if given is not None and (layer, feature) in given
        }
        if entry:
            features[f"{layer}:{feature}"] = entry
    labels = ["tokens", *(f"layer {layer}" for layer in range(nodes.n_layers)), "logits"]
    return {"tokens": texts, "rows": labels, "nodes": made, "edges": edges, "features": features}


def _node(
    graph: AttributionGraph,
    index: int,
    influence: float,
    texts: list[str],
    vocab: Sequence[str] | Mapping[int, str] | None,
) -> dict[str, Any]:
    nodes = graph.nodes
    node: dict[str, Any] = {"id": index, "activation": None, "probability": None,
                            "influence": _round(influence), "feature": -1}  # fmt: skip
    if index < nodes.n_features:
        layer, pos, feature = nodes.features[index].tolist()
        activation = _round(float(nodes.activations[index]))
        node |= {"kind": "feature", "layer": layer, "pos": pos, "feature": feature,
                 "label": f"L{layer} #{feature}", "activation": activation}  # fmt: skip
    elif index < nodes.token_start:
        layer, pos = divmod(index - nodes.error_start, nodes.n_pos)
        node |= {"kind": "error", "layer": layer, "pos": pos, "label": f"L{layer} error"}
    elif index < nodes.logit_start:
        pos = index - nodes.token_start
        node |= {"kind": "token", "layer": -1, "pos": pos, "label": texts[pos]}
    else:
        rank = index - nodes.logit_start
        token = int(nodes.logit_tokens[rank])
        label = vocab[token] if vocab is not None else str(token)
        probability = _round(float(nodes.logit_probabilities[rank]))
        node |= {"kind": "logit", "layer": nodes.n_layers, "pos": nodes.n_pos - 1,
                 "label": str(label), "probability": probability}  # fmt: skip
    node["token"] = texts[node["pos"]]
    node["row"] = node["layer"] + 1
    return node


def _lay_out(made: list[dict[str, Any]]) -> None:
    """Set each node's ``x``: a column per position, as wide as its fullest row."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for node in made:  # graph order: within a cell, features by index, logits likeliest first
        cells.setdefault((node["row"], node["pos"]), []).append(node)
    n_pos = 1 + max((node["pos"] for node in made), default=0)
    widths = [1] * n_pos
    for (_, pos), cell in cells.items():
        widths[pos] = max(widths[pos], len(cell))
    starts = [sum(widths[:pos]) for pos in range(n_pos)]
    for (_, pos), cell in cells.items():
        left = starts[pos] + (widths[pos] - len(cell)) / 2
        for at, node in enumerate(cell):
            node["x"] = left + at + 0.5
    for node in made:
        node["column"] = [starts[node["pos"]], starts[node["pos"]] + widths[node["pos"]]]


def _round(value: float) -> float:
    return float(f"{value:.{_SIGNIFICANT}g}")


def _script_json(data: dict[str, Any]) -> str:
    """JSON that cannot end its script element: ``<``, ``>`` and ``&`` as unicode escapes."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _mitk_version() -> str:
    try:
        return version("mitk")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


_LEGEND = (
    "Rows are layers (token embeddings at the bottom, logits at the top), columns the "
    "prompt's positions. Circles are transcoder features (shade: activation; area: "
    "influence on the logits), grey squares error terms, green bars token embeddings, "
    "purple circles the likeliest next tokens (area: probability). Blue edges raise "
    "their target, red ones lower it; width is |weight|."
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222;
       padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
table.header th { color: #555; font-weight: normal; }
p.note { color: #555; }
#graph-frame { overflow: auto; border: 1px solid #ddd; max-height: 80vh; }
#graph { display: block; background: #fff; }
#graph text { font-size: 11px; fill: #333; }
#graph .edge { fill: none; }
#graph .edge.lit { stroke-opacity: 0.9; }
#graph .node { stroke: #333; stroke-width: 0.8; cursor: pointer; }
#graph .dim { opacity: 0.08; }
#graph .selected { stroke: #000; stroke-width: 2.5; }
#tooltip { position: fixed; pointer-events: none; background: #fffff0; border: 1px solid #999;
           padding: 0.3em 0.6em; font-size: 12px; white-space: pre; }
#details { margin-top: 1em; }
#details h2 { margin-bottom: 0.2em; }
#details .columns { display: flex; flex-wrap: wrap; gap: 2em; }
#details td.num { text-align: right; font-variant-numeric: tabular-nums; }
footer { margin-top: 3em; color: #888; font-size: 0.9em; }
"""

# Builds the SVG from the embedded JSON; every text goes in through textContent, never as HTML.
_JS = """
(function () {
  'use strict';
  const data = JSON.parse(document.getElementById('mitk-graph-data').textContent);
  const svg = document.getElementById('graph');
  const NS = svg.namespaceURI;
  const tooltip = document.getElementById('tooltip');
  const details = document.getElementById('details');
  const ROW = 90, LEFT = 80, TOP = 20, BOTTOM = 90;
  const nRows = data.rows.length;
  // a fold, not Math.max(...list): spreading 100k+ values overflows the call stack
  const largest = (list, floor) => list.reduce((a, b) => (b > a ? b : a), floor);
  const width = largest(data.nodes.map(n => n.column[1]), 1);
  // node slots at least 22 px apart, spread to fill the frame when there are few
  const room = svg.parentElement.clientWidth - LEFT - 20;
  const UNIT = Math.min(80, Math.max(22, room / width));
  const xOf = n => LEFT + n.x * UNIT;
  const yOf = n => TOP + (nRows - 1 - n.row) * ROW + ROW / 2;
  svg.setAttribute('width', LEFT + width * UNIT + 20);
  svg.setAttribute('height', TOP + nRows * ROW + BOTTOM);
  const make = (tag, attrs, parent) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    parent.appendChild(el);
    return el;
  };
  const fmt = v => (v === null || v === undefined) ? '' : Number(v).toPrecision(4);
  const background = make('rect', {x: 0, y: 0, width: '100%', height: '100%', fill: '#fff'}, svg);
  data.rows.forEach((label, row) => {
    const y = TOP + (nRows - 1 - row) * ROW + ROW / 2;
    make('line', {x1: LEFT - 10, x2: LEFT + width * UNIT, y1: y, y2: y, stroke: '#eee'}, svg);
    make('text', {x: 6, y: y + 4, class: 'row-label'}, svg).textContent = label;
  });
  const columns = new Map();
  data.nodes.forEach(n => columns.set(n.pos, n.column));
  data.tokens.forEach((token, pos) => {
    if (!columns.has(pos)) return;
    const [a, b] = columns.get(pos);
    const x = LEFT + (a + b) / 2 * UNIT, y = TOP + nRows * ROW + 12;
    const label = make('text', {x: x, y: y, class: 'column-label',
      transform: 'rotate(35 ' + x + ' ' + y + ')'}, svg);
    label.textContent = pos + ': ' + JSON.stringify(token).slice(1, -1);
  });
  const byId = new Map(data.nodes.map(n => [n.id, n]));
  const edgeLayer = make('g', {}, svg), nodeLayer = make('g', {}, svg);
  const maxWeight = largest(data.edges.map(e => Math.abs(e.weight)), 1e-30);
  const edgeEls = data.edges.map(e => {
    const s = byId.get(e.source), t = byId.get(e.target);
    return make('line', {class: 'edge', x1: xOf(s), y1: yOf(s), x2: xOf(t), y2: yOf(t),
      stroke: e.weight >= 0 ? '#2471a3' : '#c0392b',
      'stroke-opacity': (0.3 + 0.5 * Math.abs(e.weight) / maxWeight).toFixed(2),  // faint: weak
      'stroke-width': (0.4 + 4 * Math.abs(e.weight) / maxWeight).toFixed(2)}, edgeLayer);
  });
  const maxInfluence = largest(data.nodes.map(n => n.influence), 1e-30);
  const maxActivation = largest(data.nodes.map(n => n.activation || 0), 1e-30);
  const shade = f => { // white to #d35400
    const mix = (a, b) => Math.round(a + (b - a) * f);
    return 'rgb(' + mix(255, 211) + ',' + mix(255, 84) + ',' + mix(255, 0) + ')';
  };
  const nodeEls = data.nodes.map(n => {
    const size = n.kind === 'logit' ? n.probability : n.influence / maxInfluence;
    const r = 3 + 8 * Math.sqrt(Math.max(0, Math.min(1, size)));
    const x = xOf(n), y = yOf(n);
    const common = {class: 'node kind-' + n.kind, 'data-id': n.id};
    let el;
    if (n.kind === 'error') {
      el = make('rect', {...common, x: x - r, y: y - r, width: 2 * r, height: 2 * r,
        fill: '#95a5a6'}, nodeLayer);
    } else if (n.kind === 'token') {
      el = make('rect', {...common, x: x - 8, y: y - r, width: 16, height: 2 * r,
        fill: '#27ae60'}, nodeLayer);
    } else {
      const fill = n.kind === 'logit' ? '#8e44ad'
        : shade(0.15 + 0.85 * n.activation / maxActivation);
      el = make('circle', {...common, cx: x, cy: y, r: r, fill: fill}, nodeLayer);
    }
    el.addEventListener('mouseenter', ev => showTip(n, ev));
    el.addEventListener('mousemove', ev => moveTip(ev));
    el.addEventListener('mouseleave', () => { tooltip.hidden = true; });
    el.addEventListener('click', ev => { ev.stopPropagation(); select(n); });
    return el;
  });
  const describe = n => {
    const lines = [n.kind + ': ' + n.label,
      'token ' + JSON.stringify(n.token) + ' at position ' + n.pos];
    if (n.kind === 'feature' || n.kind === 'error') lines.push('layer ' + n.layer);
    if (n.kind === 'feature') lines.push('feature ' + n.feature, 'activation ' + fmt(n.activation));
    if (n.kind === 'logit') lines.push('probability ' + fmt(n.probability));
    else lines.push('influence ' + fmt(n.influence));
    return lines;
  };
  const moveTip = ev => {
    tooltip.style.left = (ev.clientX + 14) + 'px';
    tooltip.style.top = (ev.clientY + 14) + 'px';
  };
  const showTip = (n, ev) => {
    tooltip.textContent = describe(n).join('\\n');
    tooltip.hidden = false;
    moveTip(ev);
  };
  const element = (tag, text, parent) => {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  };
  const table = (title, head, rows, parent) => {
    const box = element('div', undefined, parent);
    element('h3', title, box);
    if (!rows.length) { element('p', 'none', box).className = 'note'; return; }
    const t = element('table', undefined, box), tr = element('tr', undefined, t);
    head.forEach(h => element('th', h, tr));
    rows.forEach(row => {
      const r = element('tr', undefined, t);
      row.forEach(cell => {
        const number = typeof cell === 'number';
        element('td', number ? fmt(cell) : cell, r).className = number ? 'num' : '';
      });
    });
  };
  const name = n => n.kind + ' ' + n.label + ' @' + n.pos;
  const strongest = (list, end) => list.slice()
    .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10)
    .map(e => [name(byId.get(e[end])), e.weight]);
  function select(n) {
    const linked = new Set([n.id]);
    data.edges.forEach((e, i) => {
      const on = e.source === n.id || e.target === n.id;
      edgeEls[i].classList.toggle('dim', !on);
      edgeEls[i].classList.toggle('lit', on);
      if (on) { linked.add(e.source); linked.add(e.target); }
    });
    data.nodes.forEach((m, i) => {
      nodeEls[i].classList.toggle('dim', !linked.has(m.id));
      nodeEls[i].classList.toggle('selected', m.id === n.id);
    });
    details.replaceChildren();
    element('h2', n.kind + ' ' + n.label, details);
    element('p', describe(n).slice(1).join(' · '), details).className = 'note';
    const box = element('div', undefined, details);
    box.className = 'columns';
    const into = data.edges.filter(e => e.target === n.id);
    const out = data.edges.filter(e => e.source === n.id);
    table('Strongest inputs', ['from', 'weight'], strongest(into, 'source'), box);
    table('Strongest outputs', ['to', 'weight'], strongest(out, 'target'), box);
    if (n.kind === 'feature') {
      const extra = data.features[n.layer + ':' + n.feature] || {};
      table('Top examples', ['context', 'activation'], extra.examples || [], box);
      table('Top logit effects', ['token', 'effect'], extra.logit_effects || [], box);
    }
  }
  background.addEventListener('click', () => {
    edgeEls.concat(nodeEls).forEach(el => el.classList.remove('dim', 'lit', 'selected'));
  });
  svg.setAttribute('data-nodes', nodeEls.length);
  svg.setAttribute('data-edges', edgeEls.length);
})();
"""
