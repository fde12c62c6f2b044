"""RWKV-4 channel mixing: token shift, key, squared ReLU, value, sigmoid(receptance) gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.linear import affine
from mitk.model.rwkv.shift import blend, mix_ramp, token_shift
from mitk.shapes import Float


class ChannelMixer(nn.Module):
    """RWKV-4's channel mixing, the MLP slot of an RWKV block (``d_mlp`` hidden units).

    ``out = sigmoid(r) * (relu(k)^2 W_out)`` with ``k = blend(x, mix_k) W_in`` and
    ``r = blend(x, mix_r) W_r`` (``blend``: the token shift's mix of this and the
    previous position's input). Hooks: ``hook_shifted [batch, pos, d_model]`` (the
    previous position's input), ``hook_pre [batch, pos, d_mlp]`` (the key, before the
    activation), ``hook_post`` (``relu(k)^2``), ``hook_r [batch, pos, d_model]`` (the
    receptance, before its sigmoid). The gate multiplies the summed write, so a
    neuron's write is ``sigmoid(r) * post_n W_out[n]``, not ``post_n W_out[n]``.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.d_mlp
        self.layer = layer
        self.mix_k = nn.Parameter(torch.empty(d))
        self.mix_r = nn.Parameter(torch.empty(d))
        self.W_in = nn.Parameter(torch.empty(d, f))
        self.W_r = nn.Parameter(torch.empty(d, d))
        self.W_out = nn.Parameter(torch.empty(f, d))
        self.hook_shifted = HookPoint()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.hook_r = HookPoint()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        last_input: Float[Tensor, "batch d_model"] | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The channel mixer's write; ``last_input`` is the input before the first position."""
        shifted = self.hook_shifted(token_shift(x, last_input))
        pre = self.hook_pre(affine(blend(x, shifted, self.mix_k), self.W_in, None))
        post = self.hook_post(torch.relu(pre).square())
        r = self.hook_r(affine(blend(x, shifted, self.mix_r), self.W_r, None))
        return torch.sigmoid(r) * affine(post, self.W_out, None)

    @torch.no_grad()
    def init_rwkv_parameters(self, n_layers: int) -> None:
        """RWKV-4's initial mixes: the current token's share grows with depth."""
        ramp = mix_ramp(self.mix_k.shape[0], 1.0 - self.layer / n_layers)
        self.mix_k.copy_(ramp)
        self.mix_r.copy_(ramp)
