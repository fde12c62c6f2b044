"""Normalisation layers with hooks on the scale and the normalised output."""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.shapes import Float


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with ``hook_scale`` (trailing 1) and ``hook_normalized``.

    ``hook_normalized`` sees ``(x - mean) / scale`` before the elementwise
    weight and bias (as in TransformerLens). The fused kernel runs when neither
    hook is attached; otherwise the hooked pieces are computed explicitly.

    It normalises ``width`` dimensions (``d_model`` unless given). With ``heads``
    the input is ``[..., heads, width]`` and ``w``/``b`` are ``[heads, width]``: each
    head is normalised alone and has weights of its own (the per-head q/k norms of
    Cohere and StableLM, ``cfg.qk_norm = "head_layernorm"``).
    """

    def __init__(
        self, cfg: TransformerConfig, width: int | None = None, heads: int | None = None
    ) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        last = cfg.d_model if width is None else width
        shape = (last,) if heads is None else (heads, last)
        self.w = nn.Parameter(torch.ones(shape))
        self.b = nn.Parameter(torch.zeros(shape))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "*lead width"]) -> Float[Tensor, "*lead width"]:
        if self.hook_scale.has_hooks:
            centred = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            normalized = centred / scale
        elif self.hook_normalized.has_hooks or self.w.dim() > 1:
            # the fused kernel takes one weight for the normalised shape, not one per head
            normalized = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        else:
            return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        return self.hook_normalized(normalized) * self.w + self.b


class RMSNorm(nn.Module):
    """RMSNorm (no centring, no bias) with the same hooks as ``LayerNorm``.

    It normalises the last dimension, ``width`` wide (``d_model`` unless given:
    q/k norms normalise one head or a whole projection); leading dimensions
    are free, and ``hook_scale`` keeps them with a trailing 1.
    """

    def __init__(self, cfg: TransformerConfig, width: int | None = None) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model if width is None else width))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "*lead width"]) -> Float[Tensor, "*lead width"]:
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w


def make_norm(cfg: TransformerConfig) -> LayerNorm | RMSNorm:
    """The norm layer the config asks for."""
    return LayerNorm(cfg) if cfg.normalization == "layernorm" else RMSNorm(cfg)


def make_qk_norm(cfg: TransformerConfig, heads: int) -> LayerNorm | RMSNorm:
    """The query or key norm ``cfg.qk_norm`` asks for, for ``heads`` heads of ``d_head``.

    ``head``: one RMSNorm over ``d_head`` shared by the heads; ``projection``: one
    RMSNorm over all ``heads * d_head``; ``head_layernorm``: a LayerNorm per head.
    """
    if cfg.qk_norm == "head_layernorm":
        return LayerNorm(cfg, cfg.d_head, heads)
    return RMSNorm(cfg, cfg.d_head if cfg.qk_norm == "head" else heads * cfg.d_head)
