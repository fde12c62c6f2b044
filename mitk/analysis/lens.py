"""Logit lens: read the residual stream after each layer through the final norm and unembedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mitk.cache import ActivationCache
from mitk.cache.decompose import accumulated_resid
from mitk.cache.residual_stack import per_position_frame
from mitk.shapes import Float, Int


@dataclass(frozen=True)
class LogitLens:
    """Logits the model would output if it stopped early.

    ``logits`` is ``[layer, batch, pos, d_vocab]`` with one row per snapshot in
    ``labels`` (``"0_pre"`` is the embeddings, ``"final_post"`` the real output).
    Each snapshot goes through the final norm with its own scale, recomputed,
    since the cached final scale belongs to the last stream only.
    """

    logits: Float[Tensor, "layer batch pos d_vocab"]
    labels: list[str]

    def token_logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "layer batch pos"]:
        """The logit of ``tokens[b, p]`` at every snapshot (e.g. each position's next token)."""
        index = tokens[None, ..., None].expand(self.logits.shape[0], -1, -1, 1)
        return self.logits.gather(-1, index)[..., 0]

    def token_ranks(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "layer batch pos"]:
        """Rank (0 = top) of ``tokens[b, p]`` among all logits at every snapshot."""
        target = self.token_logits(tokens)[..., None]
        return (self.logits > target).sum(-1)

    def to_frame(self, tokens: Int[Tensor, "batch pos"]) -> pd.DataFrame:
        """Long table: one row per (layer, batch, pos) with the logit and rank of ``tokens``."""
        logit, rank = self.token_logits(tokens), self.token_ranks(tokens)
        return per_position_frame("layer", self.labels, logit=logit, rank=rank)


def logit_lens(model: Any, cache: ActivationCache) -> LogitLens:
    """Apply the final norm and unembedding to each accumulated residual snapshot.

    Needs every ``hook_resid_pre`` and the last ``hook_resid_post`` cached.
    The last snapshot reproduces the model's logits exactly.
    """
    with torch.no_grad():  # cache.accumulated_resid(apply_ln=True), typed: ln_final per snapshot
        normed, labels = accumulated_resid(cache, apply_ln=True)
        logits = model.unembed(normed.flatten(0, 1))  # [layer * batch, pos, d_vocab]
    return LogitLens(logits.view(*normed.shape[:3], -1), labels)
