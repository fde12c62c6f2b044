"""A circuit: a set of edges of a model's graph, built by hand or found, saved, compared, drawn.

Edge names follow ``mitk.analysis.discovery.graph`` (``"L0H3" -> "L1H2.k"``,
``"embed" -> "logits"``). An edge may name a position: ``Edge("L0H3",
"L1H2.k", 5)`` keeps the edge only at sequence position 5; without one it is
kept at every position. Files are JSON and are validated on reading (they may
come from anyone): shapes, names, edges and positions are all checked, and
any fault is a ``CircuitFileError`` naming the file and what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
import json
import math
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mitk.analysis.discovery.graph import GRANULARITIES, EdgeGraph, Granularity, GraphShape
from mitk.atomic import atomic_write
from mitk.errors import MitkError
from mitk.shapes import Bool, Float

FORMAT = "mitk-circuit"
VERSION = 1
MAX_FILE_BYTES = 64 * 2**20
MAX_SIZE = 1 << 16  # layers, heads and positions a circuit file may name


class CircuitFileError(MitkError, ValueError):
    """A circuit file that is not a valid circuit (names the file and the fault)."""


class Edge(NamedTuple):
    """``sender -> receiver``, at one sequence position or (``pos`` None) at all of them."""

    sender: str
    receiver: str
    pos: int | None = None


def _as_edge(edge: Any) -> Edge:
    if isinstance(edge, Edge):
        return edge
    items = tuple(edge)
    if len(items) not in (2, 3):
        raise ValueError(f"an edge is (sender, receiver) or (sender, receiver, pos), got {edge!r}")
    pos = items[2] if len(items) == 3 else None
    # numpy integers count (a pos read from a frame); bools and floats do not
    if pos is not None and (isinstance(pos, bool) or not isinstance(pos, Integral) or pos < 0):
        raise ValueError(f"edge {edge!r}: pos must be a non-negative int or None")
    return Edge(str(items[0]), str(items[1]), None if pos is None else int(pos))


@dataclass(frozen=True)
class Circuit:
    """A set of edges of the graph of one model shape at one granularity.

    Build one with ``Circuit.of(model, edges)``; edges that do not exist in
    the graph (unknown names, a sender that writes after the receiver reads)
    are refused by name. ``mask()`` is the 0/1 keep-mask the masked run uses.
    """

    shape: GraphShape
    granularity: Granularity
    edges: frozenset[Edge] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        edges = frozenset(_as_edge(e) for e in self.edges)
        object.__setattr__(self, "edges", edges)
        for edge in edges:
            self.graph.edge_index(edge.sender, edge.receiver)

    @classmethod
    def of(
        cls, model: Any, edges: Iterable[Any] = (), granularity: Granularity = "heads"
    ) -> Circuit:
        """A circuit of ``model``'s graph holding ``edges`` (pairs or ``Edge``s)."""
        return cls(GraphShape.of(model), granularity, frozenset(_as_edge(e) for e in edges))

    @classmethod
    def full(cls, graph: EdgeGraph) -> Circuit:
        """Every edge of ``graph``."""
        return cls(graph.shape, graph.granularity, frozenset(Edge(*e) for e in graph.edges()))

    @classmethod
    def from_mask(cls, graph: EdgeGraph, keep: Bool[Tensor, "*pos sender receiver"]) -> Circuit:
        """The edges where ``keep[s, r]`` is true (absent edges ignored).

        A ``[pos, sender, receiver]`` mask gives positional edges ``(s, r, pos)``.
        """
        chosen = (keep.bool().cpu() & graph.present).nonzero().tolist()
        if keep.dim() == 3:
            edges = frozenset(Edge(graph.senders[s], graph.receivers[r], p) for p, s, r in chosen)
        else:
            edges = frozenset(Edge(graph.senders[s], graph.receivers[r]) for s, r in chosen)
        return cls(graph.shape, graph.granularity, edges)

    @classmethod
    def top(
        cls,
        graph: EdgeGraph,
        scores: Float[Tensor, "*pos sender receiver"],
        n_edges: int,
        absolute: bool = True,
    ) -> Circuit:
        """The ``n_edges`` existing edges with the largest (absolute) scores.

        Scores ``[pos, sender, receiver]`` rank each edge at each position: the
        circuit is positional.
        """
        if scores.dim() not in (2, 3) or scores.shape[-2:] != graph.present.shape:
            raise ValueError(
                f"scores {tuple(scores.shape)} must be [*pos, sender, receiver] with "
                f"[sender, receiver] = {tuple(graph.present.shape)}"
            )
        values = scores.detach().float().cpu().abs() if absolute else scores.detach().float().cpu()
        values = values.masked_fill(~graph.present, -math.inf)
        positions = values.shape[0] if values.dim() == 3 else 1
        n_edges = max(0, min(n_edges, graph.n_edges * positions))
        keep = torch.zeros(values.numel(), dtype=torch.bool)
        keep[values.flatten().topk(n_edges).indices] = True
        return cls.from_mask(graph, keep.view(values.shape))

    @classmethod
    def random(
        cls, graph: EdgeGraph, n_edges: int, seed: int = 0, seq: int | None = None
    ) -> Circuit:
        """``n_edges`` existing edges drawn uniformly without replacement (seeded).

        With ``seq``, positional edges drawn from every edge at every position.
        """
        generator = torch.Generator().manual_seed(seed)
        shape = graph.present.shape if seq is None else (seq, *graph.present.shape)
        scores = torch.rand(shape, generator=generator)
        return cls.top(graph, scores, n_edges, absolute=False)

    @cached_property
    def graph(self) -> EdgeGraph:
        """The graph this circuit's edges belong to."""
        return EdgeGraph.build(self.shape, self.granularity)

    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge: object) -> bool:
        return isinstance(edge, tuple) and _as_edge(edge) in self.edges

    @property
    def positional(self) -> bool:
        """Whether any edge is restricted to one position."""
        return any(e.pos is not None for e in self.edges)

    def fraction(self) -> float:
        """Share of the graph's edges this circuit keeps (position-restricted edges count once)."""
        return len({(e.sender, e.receiver) for e in self.edges}) / self.graph.n_edges

    def nodes(self) -> set[str]:
        """Every sender and receiver some edge touches."""
        return {e.sender for e in self.edges} | {e.receiver for e in self.edges}

    def mask(self, seq: int | None = None) -> Float[Tensor, "*pos sender receiver"]:
        """1.0 on kept edges: ``[sender, receiver]``; ``[seq, sender, receiver]`` if positional."""
        graph = self.graph
        if not self.positional:
            keep = torch.zeros(graph.present.shape)
            for e in self.edges:
                keep[graph.edge_index(e.sender, e.receiver)] = 1.0
            return keep
        if seq is None:
            raise ValueError("a circuit with positional edges needs seq= to build its mask")
        keep = torch.zeros(seq, *graph.present.shape)
        for e in self.edges:
            s, r = graph.edge_index(e.sender, e.receiver)
            if e.pos is None:
                keep[:, s, r] = 1.0
            elif e.pos < seq:
                keep[e.pos, s, r] = 1.0
        return keep

    def _same_graph(self, other: Circuit) -> None:
        if (self.shape, self.granularity) != (other.shape, other.granularity):
            raise ValueError("the circuits belong to different graphs (model shape or granularity)")

    def __and__(self, other: Circuit) -> Circuit:
        self._same_graph(other)
        return Circuit(self.shape, self.granularity, self.edges & other.edges)

    def __or__(self, other: Circuit) -> Circuit:
        self._same_graph(other)
        return Circuit(self.shape, self.granularity, self.edges | other.edges)

    def precision_recall(self, reference: Circuit) -> tuple[float, float]:
        """(share of this circuit's edges in ``reference``, share of ``reference`` found here)."""
        self._same_graph(reference)
        hits = len(self.edges & reference.edges)
        precision = hits / len(self.edges) if self.edges else 0.0
        recall = hits / len(reference.edges) if reference.edges else 1.0
        return precision, recall

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: format tag, version, graph shape, granularity, sorted edges."""
        edges = sorted(
            self.edges, key=lambda e: (e.sender, e.receiver, -1 if e.pos is None else e.pos)
        )
        return {
            "format": FORMAT,
            "version": VERSION,
            "granularity": self.granularity,
            "shape": {
                "n_layers": self.shape.n_layers,
                "n_heads": self.shape.n_heads,
                "n_key_value_heads": self.shape.n_key_value_heads,
                "has_mlp": self.shape.has_mlp,
                "parallel_attn_mlp": self.shape.parallel_attn_mlp,
            },
            "edges": [[e.sender, e.receiver] + ([] if e.pos is None else [e.pos]) for e in edges],
        }

    def save(self, path: str | Path) -> Path:
        """Write the circuit as JSON (atomically)."""
        text = json.dumps(self.to_dict(), indent=1)
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def from_dict(cls, data: Any) -> Circuit:
        """A circuit from its JSON form; ``ValueError`` naming the first fault."""
        return _parse(data)

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit file written by ``save``, validating everything in it."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = json.loads(path.read_text(encoding="utf-8"))
            return _parse(data)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise CircuitFileError(f"{path}: not a valid circuit file: {err}") from err


def _int_field(shape: dict[str, Any], key: str, low: int) -> int:
    value = shape.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SIZE:
        raise ValueError(f"shape.{key} must be an int in [{low}, {MAX_SIZE}], got {value!r}")
    return value


def _bool_field(shape: dict[str, Any], key: str) -> bool:
    value = shape.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"shape.{key} must be true or false, got {value!r}")
    return value


def _parse(data: Any) -> Circuit:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"expected a JSON object with format {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r} (this reads {VERSION})")
    if data.get("granularity") not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}")
    shape_data = data.get("shape")
    if not isinstance(shape_data, dict):
        raise ValueError("shape must be an object")
    shape = GraphShape(
        n_layers=_int_field(shape_data, "n_layers", 1),
        n_heads=_int_field(shape_data, "n_heads", 1),
        n_key_value_heads=_int_field(shape_data, "n_key_value_heads", 1),
        has_mlp=_bool_field(shape_data, "has_mlp"),
        parallel_attn_mlp=_bool_field(shape_data, "parallel_attn_mlp"),
    )
    if shape.n_heads % shape.n_key_value_heads:
        raise ValueError("shape.n_heads must be a multiple of shape.n_key_value_heads")
    if shape.n_layers * (shape.n_heads + 1) > MAX_SIZE:
        raise ValueError("the graph this shape describes is too large for a circuit file")
    raw = data.get("edges")
    if not isinstance(raw, list):
        raise ValueError("edges must be a list")
    edges = []
    for i, item in enumerate(raw):
        ok = (
            isinstance(item, list)
            and len(item) in (2, 3)
            and all(isinstance(x, str) for x in item[:2])
        )
        if ok and len(item) == 3:
            ok = type(item[2]) is int and 0 <= item[2] <= MAX_SIZE
        if not ok:
            raise ValueError(f"edges[{i}] must be [sender, receiver] or [sender, receiver, pos]")
        edges.append(Edge(*item))
    return Circuit(shape, data["granularity"], frozenset(edges))
