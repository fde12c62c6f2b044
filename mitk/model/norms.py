"""Normalisation layers with hooks on the scale and the normalised output."""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.shapes import Float


class LayerNorm(nn.Module):
    """LayerNorm over ``d_model`` with ``hook_scale`` ``[batch, pos, 1]`` and ``hook_normalized``.

    ``hook_normalized`` sees ``(x - mean) / scale`` before the elementwise
    weight and bias (as in TransformerLens). The fused kernel runs when neither
    hook is attached; otherwise the hooked pieces are computed explicitly.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.hook_scale.has_hooks:
            centred = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            normalized = centred / scale
        elif self.hook_normalized.has_hooks:
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
