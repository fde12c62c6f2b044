"""The frozen replacement model's transpose, written out: VJPs without autograd.

With attention patterns and norm scales held, every block is a fixed linear
map of the residual stream (plus constants), so a batch of cotangents can be
carried from the logits and the transcoder inputs down to the MLP writes and
the token embeddings by hand: per layer, ``W_O^T``, the pattern's transpose,
``W_V^T`` and the norms' frozen Jacobians (a skip-transcoder adds ``W_skip``).
That skips what autograd would also do (the query and key columns of the
packed projection, the zero-filled gradients of the split) and is about twice
as fast. Models it does not cover use autograd through the same frozen model
(``DirectEffects`` chooses); tests check the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mitk.analysis.graphs.replacement import PromptState
from mitk.analysis.graphs.transcoders import Dictionaries
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int

Sink = Callable[[int, Tensor], None]
"""``sink(layer, gradient [batch, p, d_model])``: layer -1 is the token embeddings."""


def covers(model: HookedTransformer) -> bool:
    """Whether ``FrozenTranspose`` runs ``model``: pre-norm blocks, plain attention, no extras."""
    cfg = model.cfg
    return (
        cfg.causal
        and cfg.norm_position == "pre"
        and cfg.pre_norms
        and cfg.final_norm
        and not cfg.sandwich_norms
        and not cfg.embed_norm
        and not cfg.attn_sinks
        and cfg.attention_type == "mha"
        and cfg.normalization in ("layernorm", "rmsnorm")
        and cfg.has_mlp
    )


class _Norm:
    """A norm, its scale held: ``y = centre(x) / scale * w (+ b)``; ``back`` is its transpose."""

    def __init__(self, centred: bool, weight: Tensor | None, scale: Tensor) -> None:
        self.centred, self.weight, self.scale = centred, weight, scale  # scale [pos, 1]

    def back(self, g: Float[Tensor, "batch p d_model"]) -> Float[Tensor, "batch p d_model"]:
        """The transpose on the first ``p`` positions."""
        scale = self.scale[: g.shape[1]]
        g = g / scale if self.weight is None else g * (self.weight / scale)
        return g - g.mean(-1, keepdim=True) if self.centred else g


class FrozenTranspose:
    """Gradients at the token embeddings and MLP writes for batches of targets (see ``grads``)."""

    def __init__(
        self, model: HookedTransformer, transcoders: Dictionaries, state: PromptState
    ) -> None:
        cfg = model.cfg
        centred = cfg.normalization == "layernorm"
        held = state.held
        self.parallel = cfg.parallel_attn_mlp
        self.n_layers, self.n_pos, self.d_model = state.writes.shape
        self.n_heads, self.d_head, self.group = cfg.n_heads, cfg.d_head, cfg.kv_group_size

        def norm(name: str, module: nn.Module, with_weight: bool = True) -> _Norm:
            weight = module.get_parameter("w").detach() if with_weight else None
            return _Norm(centred, weight, held[f"{name}.hook_scale"][0])

        self.ln1, self.ln2, self.mlp_in, self.patterns, self.W_V, self.W_O = [], [], [], [], [], []
        self.skips: list[Tensor | None] = []
        for layer, block in enumerate(model.blocks):
            prefix = f"blocks.{layer}"
            self.ln1.append(norm(f"{prefix}.ln1", block.ln1))
            self.ln2.append(norm(f"{prefix}.ln2", block.ln2))
            # what the transcoder reads, seen from the stream: ln2 before its weight, or the stream
            reads_normalized = transcoders.input_hook(layer).endswith("ln2.hook_normalized")
            self.mlp_in.append(
                norm(f"{prefix}.ln2", block.ln2, False) if reads_normalized else None
            )
            self.patterns.append(held[f"{prefix}.attn.hook_pattern"][0])  # [head, query, key]
            # both as the matrices the transpose multiplies by: [d_model, head * d_head] for W_O^T,
            # [kv_head * d_head, d_model] for W_V^T
            self.W_O.append(block.attn.W_o_packed.detach().T.contiguous())
            self.W_V.append(block.attn.W_V.detach().transpose(1, 2).reshape(-1, cfg.d_model))
            self.skips.append(transcoders.skip_weight(layer))
        self.ln_final = norm("ln_final", model.ln_final)

    def grads(
        self,
        layers: Int[Tensor, " batch"],
        positions: Int[Tensor, " batch"],
        directions: Float[Tensor, "batch d_model"],
        sink: Sink,
    ) -> None:
        """Give ``sink`` the gradients: ``sink(L, d/d writes[L])`` and ``sink(-1, d/d embed)``.

        Target ``i`` is ``directions[i]`` at layer ``layers[i]``'s transcoder input
        (``n_layers``: the final norm's output) at ``positions[i]``. Gradients are
        ``[batch, p, d_model]`` for the first ``p`` positions only: attention is
        causal, so nothing after the last target's position is reached. Layers at
        and above every target's are not reached either and are not handed over.
        """
        p = int(positions.max()) + 1
        top = int(layers.max())
        g = directions.new_zeros(layers.shape[0], p, self.d_model)
        if top == self.n_layers:
            g = g + self.ln_final.back(self._injected(layers, positions, directions, top, p))
        for layer in range(min(top, self.n_layers - 1), -1, -1):
            if layer < top:
                sink(layer, g)
            at_mlp_input = self._injected(layers, positions, directions, layer, p)
            skip = self.skips[layer]
            if skip is not None:
                at_mlp_input = at_mlp_input + g @ skip
            reads = self.mlp_in[layer]
            into_stream = at_mlp_input if reads is None else reads.back(at_mlp_input)
            if self.parallel:  # attention and MLP both read the block's input
                g = g + into_stream + self.ln1[layer].back(self._attention_back(layer, g))
            else:  # the MLP reads resid_mid = input + attention
                g = g + into_stream
                g = g + self.ln1[layer].back(self._attention_back(layer, g))
        sink(-1, g)

    def _injected(
        self, layers: Tensor, positions: Tensor, directions: Tensor, layer: int, p: int
    ) -> Float[Tensor, "batch p d_model"]:
        """The cotangent of the targets at ``layer`` (zero for the other samples)."""
        out = directions.new_zeros(layers.shape[0], p, self.d_model)
        chosen = (layers == layer).nonzero()[:, 0]
        out[chosen, positions[chosen]] = directions[chosen]
        return out

    def _attention_back(
        self, layer: int, g: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention output to input (after ln1): ``W_O^T``, ``P^T``, ``W_V^T``."""
        batch, p, _ = g.shape
        heads, d_head = self.n_heads, self.d_head
        g_z = (g @ self.W_O[layer]).view(batch, p, heads, d_head)
        # per head, the pattern's transpose mixes queries into keys: one bmm over heads
        by_head = g_z.permute(2, 1, 0, 3).reshape(heads, p, batch * d_head)
        g_v = torch.bmm(self.patterns[layer][:, :p, :p].transpose(1, 2), by_head)
        g_v = g_v.view(heads, p, batch, d_head).permute(2, 1, 0, 3)  # [batch, key, head, d_head]
        if self.group > 1:  # query heads of one key-value head share its values
            g_v = g_v.reshape(batch, p, -1, self.group, d_head).sum(3)
        return g_v.reshape(batch, p, -1) @ self.W_V[layer]
