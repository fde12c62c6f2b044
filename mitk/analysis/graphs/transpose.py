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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mitk.analysis.graphs.replacement import PromptState
from mitk.analysis.graphs.transcoders import Transcoder, input_hook
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int


def covers(model: HookedTransformer) -> bool:
    """Whether ``FrozenTranspose`` runs ``model``: pre-norm blocks, plain attention, no extras."""
    cfg = model.cfg
    return (
        cfg.norm_position == "pre"
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

    def back(self, g: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        g = g / self.scale if self.weight is None else g * (self.weight / self.scale)
        return g - g.mean(-1, keepdim=True) if self.centred else g


class FrozenTranspose:
    """Gradients at the token embeddings and MLP writes for batches of targets (see ``grads``)."""

    def __init__(
        self, model: HookedTransformer, transcoders: Sequence[Transcoder], state: PromptState
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
            reads_normalized = input_hook(transcoders[layer]).endswith("ln2.hook_normalized")
            self.mlp_in.append(
                norm(f"{prefix}.ln2", block.ln2, False) if reads_normalized else None
            )
            self.patterns.append(held[f"{prefix}.attn.hook_pattern"][0])  # [head, query, key]
            self.W_V.append(block.attn.W_V.detach())  # [kv_head, d_model, d_head]
            self.W_O.append(block.attn.W_o_packed.detach())  # [head * d_head, d_model]
            skip = getattr(transcoders[layer], "W_skip", None)
            has_skip = getattr(transcoders[layer].cfg, "skip_connection", False)
            self.skips.append(skip.detach() if has_skip and skip is not None else None)
        self.ln_final = norm("ln_final", model.ln_final)

    def grads(
        self,
        layers: Int[Tensor, " batch"],
        positions: Int[Tensor, " batch"],
        directions: Float[Tensor, "batch d_model"],
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch n_layers pos d_model"]]:
        """``(d target / d embed, d target / d writes)`` for target ``i``: ``directions[i]`` at
        layer ``layers[i]``'s transcoder input (``n_layers``: the final norm's output), at
        ``positions[i]``."""
        batch = layers.shape[0]
        g = directions.new_zeros(batch, self.n_pos, self.d_model)
        writes = directions.new_zeros(batch, self.n_layers, self.n_pos, self.d_model)
        top = int(layers.max())
        if top == self.n_layers:
            g = g + self.ln_final.back(self._injected(layers, positions, directions, top))
        for layer in range(min(top, self.n_layers - 1), -1, -1):
            writes[:, layer] = g
            at_mlp_input = self._injected(layers, positions, directions, layer)
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
        return g, writes

    def _injected(
        self, layers: Tensor, positions: Tensor, directions: Tensor, layer: int
    ) -> Float[Tensor, "batch pos d_model"]:
        """The cotangent of the targets at ``layer`` (zero for the other samples)."""
        out = directions.new_zeros(layers.shape[0], self.n_pos, self.d_model)
        chosen = (layers == layer).nonzero()[:, 0]
        out[chosen, positions[chosen]] = directions[chosen]
        return out

    def _attention_back(
        self, layer: int, g: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention output to input (after ln1): ``W_O^T``, ``P^T``, ``W_V^T``."""
        batch = g.shape[0]
        g_z = (g @ self.W_O[layer].T).view(batch, self.n_pos, self.n_heads, self.d_head)
        g_v = torch.einsum("hqk,bqhe->bkhe", self.patterns[layer], g_z)
        if self.group > 1:  # query heads of one key-value head share its values
            g_v = g_v.view(batch, self.n_pos, -1, self.group, self.d_head).sum(3)
        return torch.einsum("bkge,gde->bkd", g_v, self.W_V[layer])
