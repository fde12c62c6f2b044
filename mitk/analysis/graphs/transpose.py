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

import bisect
from collections.abc import Callable
import itertools

import torch
from torch import Tensor, nn

from mitk.analysis.graphs.replacement import PromptState
from mitk.analysis.graphs.transcoders import Dictionaries
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int

Sink = Callable[[int, Tensor, int], None]
"""``sink(layer, gradient [n, p, d_model], start)``: the gradients of targets ``start ..
start + n - 1`` (the others' are zero); layer -1 is the token embeddings."""


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
        return self._back(g, self.scale[: g.shape[1]])

    def back_at(
        self, rows: Float[Tensor, "n d_model"], positions: Int[Tensor, " n"]
    ) -> Float[Tensor, "n d_model"]:
        """The transpose of single rows, each at its own position."""
        return self._back(rows, self.scale[positions])

    def _back(self, g: Tensor, scale: Tensor) -> Tensor:
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

        self.mlp_in: list[_Norm | None] = []
        self.mix: list[Tensor] = []
        self.W_O: list[Tensor] = []
        self.W_V: list[Tensor] = []
        self.skips: list[Tensor | None] = []
        for layer, block in enumerate(model.blocks):
            prefix = f"blocks.{layer}"
            # what the transcoder reads, seen from the stream: ln2 before its weight, or the stream
            reads_normalized = transcoders.input_hook(layer).endswith("ln2.hook_normalized")
            self.mlp_in.append(
                norm(f"{prefix}.ln2", block.ln2, False) if reads_normalized else None
            )
            # ln1's transpose is folded into the attention's: its 1/scale (per key position)
            # into the pattern's transpose, its weight and centring into W_V^T's columns, so
            # that no elementwise pass over the batch is left
            pattern = held[f"{prefix}.attn.hook_pattern"][0]  # [head, query, key]
            scale = held[f"{prefix}.ln1.hook_scale"][0]  # [key, 1]
            self.mix.append((pattern.transpose(1, 2) / scale).contiguous())  # [head, key, query]
            # as the matrices the transpose multiplies by: [d_model, head * d_head] for W_O^T,
            # [kv_head * d_head, d_model] for W_V^T (ln1's weight and centring folded in)
            self.W_O.append(block.attn.W_o_packed.detach().T.contiguous())
            W_V = block.attn.W_V.detach().transpose(1, 2).reshape(-1, cfg.d_model)
            W_V = W_V * block.ln1.get_parameter("w").detach()
            self.W_V.append((W_V - W_V.mean(-1, keepdim=True) if centred else W_V).contiguous())
            self.skips.append(transcoders.skip_weight(layer))
        self.ln_final = norm("ln_final", model.ln_final)

    def grads(
        self,
        layers: Int[Tensor, " batch"],
        positions: Int[Tensor, " batch"],
        directions: Float[Tensor, "batch d_model"],
        sink: Sink,
    ) -> None:
        """Give ``sink`` the gradients: ``sink(L, d/d writes[L], start)`` and ``sink(-1, ...)``.

        Target ``i`` is ``directions[i]`` at layer ``layers[i]``'s transcoder input
        (``n_layers``: the final norm's output) at ``positions[i]``; ``layers``
        must not decrease (``ValueError``). Gradients are ``[n, p, d_model]`` for
        the first ``p`` positions only (attention is causal: nothing after the last
        target's position is reached) and for targets ``start..`` only: the targets
        below a layer's MLP do not reach it, and are skipped there.
        """
        order = layers.tolist()
        if any(a > b for a, b in itertools.pairwise(order)):
            raise ValueError("targets must come in layer order (sort them by layer)")
        p = int(positions.max()) + 1
        top = order[-1]
        g = directions.new_zeros(len(order), p, self.d_model)
        if top == self.n_layers:
            start = bisect.bisect_left(order, top)
            rows = self.ln_final.back_at(directions[start:], positions[start:])
            g[torch.arange(start, len(order)), positions[start:]] = rows
        for layer in range(min(top, self.n_layers - 1), -1, -1):
            # targets above this layer's MLP (the rest have g = 0 here), and those at it
            here, above = bisect.bisect_left(order, layer), bisect.bisect_left(order, layer + 1)
            if layer < top:
                sink(layer, g[above:], above)
            reads, skip = self.mlp_in[layer], self.skips[layer]
            old = g[above:]
            from_above = old
            if skip is not None:  # the skip term's input is the MLP's: through reads' transpose
                from_skip = old @ skip
                from_above = old + (from_skip if reads is None else reads.back(from_skip))
            # a block's attention reads the stream the MLP wrote into, except in a parallel
            # block, where both read the block's input
            attention_reads = old if self.parallel else from_above
            g[above:] = from_above + self._attention_back(layer, attention_reads)
            if above > here:  # targets at this layer: one row each, at their position
                fresh = slice(here, above)
                rows = directions[fresh]
                if reads is not None:
                    rows = reads.back_at(rows, positions[fresh])
                g[torch.arange(here, above), positions[fresh]] = rows
                if not self.parallel:
                    g[fresh] += self._attention_back_rows(layer, rows, positions[fresh], p)
        sink(-1, g, 0)

    def _attention_back(
        self, layer: int, g: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention output to the stream it reads: ``W_O^T``, ``P^T`` and ``W_V^T`` with ln1's
        transpose folded in (see ``__init__``)."""
        batch, p, _ = g.shape
        heads, d_head = self.n_heads, self.d_head
        if batch == 0:
            return g
        g_z = (g @ self.W_O[layer]).view(batch, p, heads, d_head)
        # per head, the pattern's transpose mixes queries into keys: one bmm over heads
        by_head = g_z.permute(2, 1, 0, 3).reshape(heads, p, batch * d_head)
        g_v = torch.bmm(self.mix[layer][:, :p, :p], by_head)
        g_v = g_v.view(heads, p, batch, d_head).permute(2, 1, 0, 3)  # [batch, key, head, d_head]
        if self.group > 1:  # query heads of one key-value head share its values
            g_v = g_v.reshape(batch, p, -1, self.group, d_head).sum(3)
        return g_v.reshape(batch, p, -1) @ self.W_V[layer]

    def _attention_back_rows(
        self,
        layer: int,
        rows: Float[Tensor, "n d_model"],
        positions: Int[Tensor, " n"],
        p: int,
    ) -> Float[Tensor, "n p d_model"]:
        """``_attention_back`` of gradients that are one row each (at ``positions``).

        Each row is taken through ``W_O^T`` and ``W_V^T`` once, per head, and
        spread over the keys by its query's column of the pattern: ``p`` times
        fewer multiplications than the general case.
        """
        n = rows.shape[0]
        heads, d_head = self.n_heads, self.d_head
        g_z = (rows @ self.W_O[layer]).view(n, heads, d_head)
        W_V = self.W_V[layer].view(-1, d_head, self.d_model)  # [kv_head, d_head, d_model]
        kv_of = torch.arange(heads, device=rows.device) // self.group
        per_head = torch.einsum("nhe,hed->nhd", g_z, W_V[kv_of])  # [n, head, d_model]
        # each row's query column of the (scaled) pattern transpose: [n, key, head]
        weights = self.mix[layer][:, :p, :].index_select(2, positions).permute(2, 1, 0)
        return torch.bmm(weights, per_head)
