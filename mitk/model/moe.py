"""The mixture-of-experts MLP: a router picks ``top_k`` experts per token; their outputs add up.

Tokens are grouped by expert (one sort, one matmul chain per expert that was
chosen at all), never looped over one by one. Routing follows the reference
families exactly: softmax in float32, ``torch.topk`` over ``[tokens, n_experts]``
as Hugging Face calls it (so exact ties, e.g. a zero router, break the same way:
not by index), optional renormalisation of the chosen weights, a routed scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mitk.config import MoEConfig, TransformerConfig
from mitk.errors import ShapeMismatchError
from mitk.hooks import HookPoint
from mitk.model.linear import affine
from mitk.model.mlp import ACTIVATIONS, MLP
from mitk.shapes import Float, Int


class MixtureOfExperts(nn.Module):
    """Router plus ``n_experts`` gated MLPs (and an optional shared expert) in one MLP slot.

    Parameters: ``W_router [d_model, n_experts]`` (``b_router``), per expert
    ``W_gate``/``W_in [n_experts, d_model, d_expert]`` and ``W_out [n_experts,
    d_expert, d_model]`` (``b_gate``/``b_in``/``b_out`` with ``expert_bias``); a
    shared expert is an ordinary ``MLP`` at ``shared`` (its neurons hooked as
    ``mlp.shared.hook_post``), gated by ``sigmoid(x W_shared_gate)`` if configured.

    Hooks: ``hook_router_logits [batch, pos, n_experts]``; ``hook_expert_indices``
    (int64) and ``hook_expert_weights [batch, pos, top_k]``, which the experts then
    use, so a hook can reroute; ``hook_shared_out [batch, pos, d_model]`` (after
    its gate); and, built only when hooked, ``hook_expert_out [batch, pos,
    n_experts, d_model]``: each expert's weighted write, zero where not chosen,
    summed (as edited) into the output.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        moe: MoEConfig = cfg.moe
        self.moe = moe
        n, d, h = moe.n_experts, cfg.d_model, moe.d_expert
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_router = nn.Parameter(torch.empty(d, n))
        self.b_router = nn.Parameter(torch.zeros(n)) if moe.router_bias else None
        self.W_gate = nn.Parameter(torch.empty(n, d, h))
        self.W_in = nn.Parameter(torch.empty(n, d, h))
        self.W_out = nn.Parameter(torch.empty(n, h, d))
        bias = moe.expert_bias
        self.b_gate = nn.Parameter(torch.zeros(n, h)) if bias else None
        self.b_in = nn.Parameter(torch.zeros(n, h)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n, d)) if bias else None
        self.hook_router_logits = HookPoint()
        self.hook_expert_indices = HookPoint()
        self.hook_expert_weights = HookPoint()
        # n_experts times the output's size: built only for a hook that asks
        self.hook_expert_out = HookPoint(derived=True)
        if moe.d_shared:
            shared = cfg.replace(d_mlp=moe.d_shared, gated_mlp=True, mlp_bias=False, moe=None)
            self.shared = MLP(shared)
            self.W_shared_gate = nn.Parameter(torch.empty(d, 1)) if moe.shared_gate else None
            self.hook_shared_out = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        logits = self.hook_router_logits(affine(x, self.W_router, self.b_router))
        weights, indices = self.route(logits)
        indices = self.hook_expert_indices(indices)
        weights = self.hook_expert_weights(weights.to(x.dtype))
        if self.hook_expert_indices.has_hooks:
            self._check_indices(indices)
        if self.hook_expert_out.has_hooks:
            per_expert = self.hook_expert_out(self.expert_writes(x, indices, weights))
            out = per_expert.sum(2)
        else:
            flat = x.reshape(-1, x.shape[-1])
            tokens, _, ys = self._grouped(flat, indices, weights)
            out = flat.new_zeros(flat.shape).index_add_(0, tokens, ys).view(x.shape)
        if self.moe.d_shared:
            out = out + self.hook_shared_out(self.shared_write(x))
        return out

    def route(
        self, logits: Float[Tensor, "*lead n_experts"]
    ) -> tuple[Float[Tensor, "*lead top_k"], Int[Tensor, "*lead top_k"]]:
        """Each token's expert weights and indices from its router logits (float32 math)."""
        moe = self.moe
        probs = logits.float().softmax(-1).reshape(-1, moe.n_experts)
        if moe.n_groups > 1:  # only the experts of each token's best groups compete
            grouped = probs.view(-1, moe.n_groups, moe.n_experts // moe.n_groups)
            best = torch.topk(grouped.max(-1).values, moe.top_groups, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(grouped[..., 0]).scatter_(1, best, 1.0).bool()
            probs = grouped.masked_fill(~keep[..., None], 0.0).view(-1, moe.n_experts)
        weights, indices = torch.topk(probs, moe.top_k, dim=-1)
        if moe.norm_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        lead = logits.shape[:-1]
        return (weights * moe.routed_scale).view(*lead, -1), indices.view(*lead, -1)

    def expert_writes(
        self,
        x: Float[Tensor, "*lead d_model"],
        indices: Int[Tensor, "*lead top_k"],
        weights: Float[Tensor, "*lead top_k"],
    ) -> Float[Tensor, "*lead n_experts d_model"]:
        """Each expert's weighted write for inputs ``x`` routed by ``indices``/``weights``.

        Zero where an expert was not chosen; ``.sum(-2)`` is the routed output
        (without the shared expert). Memory is ``n_experts`` times the output's.
        """
        flat = x.reshape(-1, x.shape[-1])
        tokens, expert_ids, ys = self._grouped(flat, indices, weights)
        out = flat.new_zeros(flat.shape[0], self.moe.n_experts, flat.shape[1])
        out[tokens, expert_ids] = ys  # top-k indices are distinct per token
        return out.view(*x.shape[:-1], self.moe.n_experts, x.shape[-1])

    def shared_write(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
        """The shared expert's output, times its sigmoid gate where it has one."""
        out = self.shared(x)
        if self.W_shared_gate is not None:
            out = out * torch.sigmoid(affine(x, self.W_shared_gate, None))
        return out

    def _grouped(
        self, flat: Tensor, indices: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens, experts, writes)``: the (token, expert) pairs sorted by expert and their
        weighted expert outputs, each expert run once on all of its tokens."""
        chosen = indices.reshape(-1)
        order = chosen.argsort(stable=True)
        tokens = order // indices.shape[-1]
        counts = torch.bincount(chosen, minlength=self.moe.n_experts).tolist()
        inputs = flat[tokens].split(counts)
        outs = [self._expert(e, xs) for e, xs in enumerate(inputs) if xs.shape[0]]
        ys = torch.cat(outs) if outs else flat[:0]
        return tokens, chosen[order], ys * weights.reshape(-1)[order, None]

    def _expert(self, e: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """Expert ``e``'s gated MLP on the tokens routed to it."""
        gate = _maybe_add(x @ self.W_gate[e], self.b_gate, e)
        linear = _maybe_add(x @ self.W_in[e], self.b_in, e)
        if limit := self.moe.clamp_limit:  # gpt-oss's clamped SwiGLU
            gate = gate.clamp(max=limit)
            linear = linear.clamp(-limit, limit)
            hidden = (linear + 1) * gate * torch.sigmoid(self.moe.clamp_alpha * gate)
        else:
            hidden = self.act(gate) * linear
        return _maybe_add(hidden @ self.W_out[e], self.b_out, e)

    def _check_indices(self, indices: Tensor) -> None:
        """A hook's replacement indices must be distinct experts in range.

        Their shape and dtype are the HookPoint's to check (it refuses any change).
        """
        n = self.moe.n_experts
        if bool(((indices < 0) | (indices >= n)).any()):
            raise ShapeMismatchError(f"hook_expert_indices holds experts outside [0, {n})")
        ordered = indices.sort(-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ShapeMismatchError("hook_expert_indices names an expert twice for one token")


def _maybe_add(x: Tensor, bias: Tensor | None, e: int) -> Tensor:
    return x if bias is None else x + bias[e]
