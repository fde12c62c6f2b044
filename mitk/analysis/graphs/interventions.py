"""Checking a graph by intervening: clamp features in the real model, compare with the graph.

The graph's edges are direct effects under frozen attention and norms with
every other feature held. The real model lets everything respond: attention
patterns and norm scales move, later features change and change what they
write. ``check_intervention`` sets chosen features to new values and reports,
per logit node, the graph's prediction beside the real change, so a user sees
where the linear picture holds and where it breaks.

The real run is circuit-tracer's ``feature_intervention`` without freezing:
each MLP keeps its true output and adds ``(value - live activation) W_dec``
for the clamped features, the live activation being the transcoder's on that
run's own input (a cross-layer feature adds its decoder vector into every
layer it writes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.graphs.nodes import AttributionGraph
from mitk.analysis.graphs.replacement import HookFn, prompt_state, prompt_tokens
from mitk.analysis.graphs.transcoders import OUTPUT_HOOK, Dictionaries, TranscoderSet, dictionaries
from mitk.hooks import HookPoint
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int


@dataclass(frozen=True)
class InterventionCheck:
    """Per logit node: the demeaned logit's change the graph predicts and the real one.

    ``predicted`` is the sum of the clamped features' edges into each logit, each
    scaled by ``value / activation - 1`` (exact for the frozen model);
    ``observed`` is the change in the real model, where everything responds.
    """

    features: Int[Tensor, "k 3"]
    values: Float[Tensor, " k"]
    logit_tokens: Int[Tensor, " n_logits"]
    predicted: Float[Tensor, " n_logits"]
    observed: Float[Tensor, " n_logits"]

    def to_frame(self) -> pd.DataFrame:
        """One row per logit node: ``token, predicted, observed, gap``."""
        return pd.DataFrame({
            "token": self.logit_tokens.tolist(),
            "predicted": self.predicted.tolist(),
            "observed": self.observed.tolist(),
            "gap": (self.observed - self.predicted).tolist(),
        })  # fmt: skip


@torch.no_grad()
def check_intervention(
    model: HookedTransformer,
    transcoders: TranscoderSet,
    tokens: Int[Tensor, "..."],
    graph: AttributionGraph,
    features: Sequence[tuple[int, int, int]] | Int[Tensor, "k 3"],
    values: float | Sequence[float] | Float[Tensor, " k"] = 0.0,
    *,
    frozen: bool = False,
) -> InterventionCheck:
    """Set feature nodes ``(layer, pos, feature)`` of ``graph`` to ``values`` (0: ablate).

    ``tokens`` and ``transcoders`` must be the graph's; a feature that is no
    node of it raises ``KeyError``. ``frozen=True`` holds attention patterns
    and norm scales at their values on the prompt in the real run too, so that
    only later features' responses separate it from the graph.
    """
    layers = dictionaries(model, transcoders)
    ids = prompt_tokens(model, tokens)
    nodes = graph.nodes
    if not torch.equal(ids.cpu(), nodes.tokens.cpu()):
        raise ValueError("tokens differ from the graph's prompt")
    chosen = torch.as_tensor(features, dtype=torch.long).reshape(-1, 3)
    targets = torch.as_tensor(values, dtype=graph.adjacency.dtype).expand(len(chosen)).clone()
    index = torch.tensor([nodes.feature_index(*f) for f in chosen.tolist()], dtype=torch.long)
    scale = targets / nodes.activations[index].cpu() - 1
    into_logits = graph.adjacency[nodes.logit_start :][:, index]
    predicted = into_logits @ scale.to(into_logits.device)
    unembed = model.unembed.W_U.detach()
    directions = unembed[:, nodes.logit_tokens] - unembed.mean(-1, keepdim=True)
    held = prompt_state(model, layers, ids).held if frozen else {}
    clean = _hidden(model, ids, [], held)[-1] @ directions
    hooks = _clamp_hooks(layers, chosen, targets)
    observed = _hidden(model, ids, hooks, held)[-1] @ directions - clean
    return InterventionCheck(chosen, targets, nodes.logit_tokens, predicted, observed)


def _hidden(
    model: HookedTransformer,
    ids: Tensor,
    hooks: list[tuple[str, HookFn]],
    held: Mapping[str, Tensor],
) -> Tensor:
    with model.hooks(hooks):
        hidden = model(ids[None], torch.ones_like(ids[None]), return_type="hidden", hold=held)
    return hidden[0]


class _Clamp:
    """One source layer's clamps: adds ``(value - live activation) W_dec`` to each MLP it writes."""

    def __init__(self, layers: Dictionaries, layer: int, at: Tensor, values: Tensor) -> None:
        self.layers, self.layer, self.at, self.values = layers, layer, at, values  # at: [k, 2]
        self.rows = layers.decoder_rows(layer, at[:, 1])  # [k, span, d_model]
        self.change: Tensor | None = None

    def keep(self, x: Tensor, hook: HookPoint) -> None:
        # the live activation is read where the latents read: before any layer they write
        live = self.layers.encode(self.layer, x[0])
        pos, feature = self.at[:, 0].to(x.device), self.at[:, 1].to(x.device)
        self.change = self.values.to(live) - live[pos, feature]

    def add(self, slot: int) -> HookFn:
        def hook_fn(x: Tensor, hook: HookPoint) -> Tensor:
            assert self.change is not None  # the input hook fires first
            pos = self.at[:, 0].to(x.device)
            delta = torch.zeros_like(x[0])
            delta.index_add_(0, pos, self.change[:, None] * self.rows[:, slot].to(delta))
            return x + delta[None]

        return hook_fn


def _clamp_hooks(layers: Dictionaries, chosen: Tensor, values: Tensor) -> list[tuple[str, HookFn]]:
    """The hooks that clamp ``chosen`` (``[k, 3]``) to ``values`` in a real forward."""
    hooks: list[tuple[str, HookFn]] = []
    for layer in sorted(set(chosen[:, 0].tolist())):
        here = chosen[:, 0] == layer
        clamp = _Clamp(layers, layer, chosen[here, 1:], values[here])
        hooks.append((layers.input_hook(layer), clamp.keep))
        hooks += [
            (f"blocks.{layer + slot}.{OUTPUT_HOOK}", clamp.add(slot))
            for slot in range(layers.span(layer))
        ]
    return hooks
