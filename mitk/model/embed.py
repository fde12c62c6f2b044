"""Token, positional and token-type embeddings, and the unembedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.linear import affine
from mitk.model.softcap import soft_cap
from mitk.shapes import Float, Int


class Embed(nn.Module):
    """Token ids to vectors: ``W_E [d_vocab, d_model]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class PositionTable(nn.Module):
    """An absolute position embedding: ``at(position_ids)``, or TransformerLens's call on tokens."""

    def at(self, position_ids: Int[Tensor, "#batch pos"]) -> Float[Tensor, "#batch pos d_model"]:
        """The embedding of each position id."""
        raise NotImplementedError

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        past_kv_pos_offset: int = 0,
        attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Position embeddings for ``tokens`` (their ids are not read, only their shape).

        As TransformerLens's ``pos_embed(tokens)``: positions start at
        ``past_kv_pos_offset``; with an ``attention_mask`` (covering the offset
        and the tokens, 1 at real tokens) they count real tokens only and padded
        slots get zeros. A fresh tensor, safe to edit.
        """
        batch, pos = tokens.shape[:2]
        device = tokens.device
        if attention_mask is None:
            ids = torch.arange(past_kv_pos_offset, past_kv_pos_offset + pos, device=device)
            return self.at(ids[None]).expand(batch, pos, -1).clone()
        real = attention_mask.to(device).bool()[:, past_kv_pos_offset : past_kv_pos_offset + pos]
        counted = (attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)
        ids = counted[:, past_kv_pos_offset : past_kv_pos_offset + pos]
        return self.at(ids).masked_fill(~real[..., None], 0.0)


class PosEmbed(PositionTable):
    """Learned absolute positions: ``W_pos [n_ctx, d_model]``, indexed by position id."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def at(self, position_ids: Int[Tensor, "#batch pos"]) -> Float[Tensor, "#batch pos d_model"]:
        """Rows of ``W_pos``."""
        return self.W_pos[position_ids]


class TokenTypeEmbed(nn.Module):
    """Token-type (segment) ids to vectors: ``W_token_type [token_types, d_model]`` (BERT)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_token_type = nn.Parameter(torch.empty(cfg.token_types, cfg.d_model))

    def forward(
        self, token_type_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos d_model"]:
        return self.W_token_type[token_type_ids]


class SinusoidalPosEmbed(PositionTable):
    """Fixed sinusoids (Vaswani et al.): ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1]`` cos.

    Computed from the position ids on each forward (no parameters), in fp32
    and then cast, so every dtype sees the same table.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model

    def at(self, position_ids: Int[Tensor, "#batch pos"]) -> Float[Tensor, "#batch pos d_model"]:
        """The sinusoids at each position id (fp32)."""
        return sinusoids(position_ids, self.d_model)


def sinusoids(
    position_ids: Int[Tensor, "#batch pos"], d_model: int
) -> Float[Tensor, "#batch pos d_model"]:
    """The sinusoidal table at ``position_ids`` (fp32); odd ``d_model`` drops the last cosine."""
    exponents = torch.arange(0, d_model, 2, device=position_ids.device).float() / d_model
    angles = position_ids.float()[..., None] / (10000.0**exponents)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return table[..., :d_model]


class Unembed(nn.Module):
    """Residual stream to logits: ``W_U [d_model, d_vocab]`` and optional ``b_U``.

    With ``cfg.output_softcap`` (Gemma-2) the logits are ``cap * tanh((x W_U + b_U) / cap)``:
    direct logit attribution is then exact for the pre-cap logits only.

    Hooks, as TransformerLens's: ``hook_in`` ``[batch, pos, d_model]`` (the final
    norm's output) and ``hook_out`` ``[batch, pos, d_vocab]`` (the logits before
    any soft-capping). ``forward`` unembeds in chunks for ``return_type="loss"``
    unless one of them is hooked, so each fires once, on every position.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab)) if cfg.unembed_bias else None
        self.softcap = cfg.output_softcap
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    @property
    def hooked(self) -> bool:
        """Whether a hook is attached to ``hook_in`` or ``hook_out``."""
        return bool(self.hook_in.has_hooks or self.hook_out.has_hooks)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        logits = self.hook_out(affine(self.hook_in(x), self.W_U, self.b_U))
        return soft_cap(logits, self.softcap) if self.softcap else logits
