"""The MLP sublayer, plain or gated, with hooks on its neurons."""

from __future__ import annotations

from collections.abc import Callable
import functools

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.linear import affine
from mitk.shapes import Float

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, or gated: ``(act(x W_gate) * (x W_in)) W_out``.

    Hooks (all ``[batch, pos, d_mlp]``): ``hook_pre`` is the activation's input
    (the gate's, for gated MLPs), ``hook_pre_linear`` the linear branch of a
    gated MLP, ``hook_post`` the neuron activations that ``W_out`` reads.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp)) if cfg.mlp_bias else None
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp)) if cfg.gated_mlp else None
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.mlp_bias else None
        self.hook_pre = HookPoint()
        if cfg.gated_mlp:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.W_gate is None:
            post = self.act(self.hook_pre(affine(x, self.W_in, self.b_in)))
        else:
            gate = self.hook_pre(affine(x, self.W_gate, None))
            linear = self.hook_pre_linear(affine(x, self.W_in, self.b_in))
            post = self.act(gate) * linear
        return affine(self.hook_post(post), self.W_out, self.b_out)
