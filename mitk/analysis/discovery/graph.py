"""The computational graph circuits live in: senders, receivers and the edges between them.

Senders write into the residual stream: ``embed`` (everything before block 0:
token, position and any other embedding), each attention head ``L{l}H{h}``
and each MLP ``L{l}_mlp``. Receivers read from it: each head's query input
``L{l}H{h}.q``, each key/value input, each MLP's input ``L{l}_mlp`` and the
``logits``. An edge ``sender -> receiver`` exists when the sender writes
before the receiver reads.

Grouped-query attention: a key or value is computed once per key-value head
and read by every query head of its group, so the k/v receivers are per
key-value head, ``L{l}KV{g}.k`` / ``L{l}KV{g}.v`` (query heads ``g * group``
to ``(g + 1) * group - 1``). With one query head per key-value head they are
named like the heads, ``L{l}H{h}.k``.

``granularity="layers"`` coarsens the same graph: senders ``embed``,
``L{l}_attn`` (all heads of a layer), ``L{l}_mlp``; receivers ``L{l}_attn``
(every q/k/v input of the layer), ``L{l}_mlp``, ``logits``. A layer edge
stands for every head-level edge between its members, which is how it is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor

from mitk.errors import UnsupportedModelError
from mitk.shapes import Bool, Float

Granularity = Literal["heads", "layers"]
GRANULARITIES: tuple[str, ...] = ("heads", "layers")


@dataclass(frozen=True)
class GraphShape:
    """The model facts that fix the graph: sizes and block wiring."""

    n_layers: int
    n_heads: int
    n_key_value_heads: int
    has_mlp: bool
    parallel_attn_mlp: bool

    @classmethod
    def of(cls, model: Any) -> GraphShape:
        """The shape of ``model``'s graph; refuses models whose stream is not a sum of writes."""
        cfg = model.cfg
        model.stream_writes().require_per_unit("per-head")
        if getattr(cfg, "attention_type", "mha") == "mla":
            raise UnsupportedModelError(
                "circuit discovery needs per-head q/k/v inputs; multi-head latent attention "
                "computes keys and values from a shared latent"
            )
        has_mixer = getattr(cfg, "has_mixer", lambda layer: False)
        mixers = [layer for layer in range(cfg.n_layers) if has_mixer(layer)]
        if mixers:
            raise UnsupportedModelError(
                f"circuit discovery's edges run between attention heads and MLPs; layers "
                f"{mixers} are recurrent mixers (Mamba or RWKV), with no heads to send or "
                "receive them: patch their writes (site 'mixer_out') instead"
            )
        if getattr(cfg, "norm_position", "pre") == "post" or not getattr(cfg, "pre_norms", True):
            raise UnsupportedModelError(
                "circuit discovery needs pre-norm blocks (each sublayer reads the raw stream sum)"
            )
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_key_value_heads=cfg.n_key_value_heads,
            has_mlp=bool(cfg.has_mlp),
            parallel_attn_mlp=bool(cfg.has_mlp and cfg.parallel_attn_mlp),
        )

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.n_heads // self.n_key_value_heads


def _kv_label(shape: GraphShape, layer: int, g: int, channel: str) -> str:
    head = f"H{g}" if shape.group == 1 else f"KV{g}"
    return f"L{layer}{head}.{channel}"


@dataclass(frozen=True)
class _Node:
    label: str
    order: float  # senders: when written; receivers: when read
    layer: int  # -1 embed, n_layers logits
    kind: str  # embed | head | mlp | q | k | v | logits | attn
    index: int  # head or key-value head within the layer (0 otherwise)


def _head_senders(shape: GraphShape) -> list[_Node]:
    nodes = [_Node("embed", -1.0, -1, "embed", 0)]
    for L in range(shape.n_layers):
        nodes += [_Node(f"L{L}H{h}", float(L), L, "head", h) for h in range(shape.n_heads)]
        if shape.has_mlp:
            nodes.append(_Node(f"L{L}_mlp", L + 0.5, L, "mlp", 0))
    return nodes


def _head_receivers(shape: GraphShape) -> list[_Node]:
    nodes = []
    for L in range(shape.n_layers):
        nodes += [_Node(f"L{L}H{h}.q", float(L), L, "q", h) for h in range(shape.n_heads)]
        for channel in ("k", "v"):
            nodes += [
                _Node(_kv_label(shape, L, g, channel), float(L), L, channel, g)
                for g in range(shape.n_key_value_heads)
            ]
        if shape.has_mlp:
            # a parallel block's MLP reads resid_pre, like its attention
            read_at = L + (0.0 if shape.parallel_attn_mlp else 0.5)
            nodes.append(_Node(f"L{L}_mlp", read_at, L, "mlp", 0))
    nodes.append(_Node("logits", float(shape.n_layers), shape.n_layers, "logits", 0))
    return nodes


def _coarse(node: _Node, shape: GraphShape) -> str:
    if node.kind in ("head", "q", "k", "v"):
        return f"L{node.layer}_attn"
    return node.label


@dataclass(frozen=True)
class EdgeGraph:
    """Senders, receivers and which edges exist, for one model shape and granularity.

    ``present[s, r]`` is True for an edge that exists. ``sender_map`` and
    ``receiver_map`` are the 0/1 membership of each head-level node in this
    graph's nodes (identity at head granularity); ``fine_mask`` turns a mask
    over this graph's edges into the head-level mask the model runs.
    """

    shape: GraphShape
    granularity: Granularity
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    present: Bool[Tensor, "sender receiver"]
    sender_map: Float[Tensor, "fine_sender sender"]
    receiver_map: Float[Tensor, "fine_receiver receiver"]

    @classmethod
    def build(cls, shape: GraphShape, granularity: Granularity = "heads") -> EdgeGraph:
        """The graph of ``shape`` at ``granularity`` (``"heads"`` or ``"layers"``)."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        fine_s, fine_r = _head_senders(shape), _head_receivers(shape)
        name_s = [n.label if granularity == "heads" else _coarse(n, shape) for n in fine_s]
        name_r = [n.label if granularity == "heads" else _coarse(n, shape) for n in fine_r]
        senders, receivers = tuple(dict.fromkeys(name_s)), tuple(dict.fromkeys(name_r))
        sender_map = torch.zeros(len(fine_s), len(senders))
        sender_map[torch.arange(len(fine_s)), [senders.index(n) for n in name_s]] = 1.0
        receiver_map = torch.zeros(len(fine_r), len(receivers))
        receiver_map[torch.arange(len(fine_r)), [receivers.index(n) for n in name_r]] = 1.0
        fine_present = torch.tensor([[s.order < r.order for r in fine_r] for s in fine_s])
        present = (sender_map.T @ fine_present.float() @ receiver_map) > 0
        return cls(shape, granularity, senders, receivers, present, sender_map, receiver_map)

    @classmethod
    def of(cls, model: Any, granularity: Granularity = "heads") -> EdgeGraph:
        """The graph of ``model`` at ``granularity``."""
        return cls.build(GraphShape.of(model), granularity)

    @cached_property
    def fine(self) -> EdgeGraph:
        """The head-level graph this one coarsens (itself at head granularity)."""
        return self if self.granularity == "heads" else EdgeGraph.build(self.shape, "heads")

    @cached_property
    def fine_senders(self) -> list[_Node]:
        """Head-level senders in forward order (what the masked run computes)."""
        return _head_senders(self.shape)

    @cached_property
    def fine_receivers(self) -> list[_Node]:
        """Head-level receivers in forward order."""
        return _head_receivers(self.shape)

    @property
    def n_edges(self) -> int:
        """How many edges exist."""
        return int(self.present.sum())

    def edges(self) -> list[tuple[str, str]]:
        """Every existing edge, senders in forward order, then receivers."""
        pairs = self.present.nonzero().tolist()
        return [(self.senders[s], self.receivers[r]) for s, r in pairs]

    def edge_index(self, sender: str, receiver: str) -> tuple[int, int]:
        """``(s, r)`` of an existing edge; a ValueError naming what is wrong otherwise."""
        if sender not in self.senders:
            raise ValueError(f"unknown sender {sender!r} at {self.granularity} granularity")
        if receiver not in self.receivers:
            raise ValueError(f"unknown receiver {receiver!r} at {self.granularity} granularity")
        s, r = self.senders.index(sender), self.receivers.index(receiver)
        if not self.present[s, r]:
            raise ValueError(f"no edge {sender} -> {receiver}: the sender writes after it reads")
        return s, r

    def fine_mask(self, mask: Float[Tensor, "*lead sender receiver"]) -> Tensor:
        """A mask over this graph's edges as a mask over the head-level edges (same lead axes)."""
        if self.granularity == "heads":
            return mask
        sender_map, receiver_map = self.sender_map.to(mask), self.receiver_map.to(mask)
        return torch.einsum("Ss,...sr,Rr->...SR", sender_map, mask, receiver_map)

    def coarse_scores(self, fine: Float[Tensor, "*lead fine_s fine_r"]) -> Tensor:
        """Head-level per-edge scores summed into this graph's edges (linear attributions add)."""
        if self.granularity == "heads":
            return fine
        sender_map, receiver_map = self.sender_map.to(fine), self.receiver_map.to(fine)
        return torch.einsum("Ss,...SR,Rr->...sr", sender_map, fine, receiver_map)
