"""An RWKV-4 block: ``x + time_mix(ln1(x))``, then ``+ channel_mix(ln2(x))``."""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.hooks import HookPoint
from mitk.model.forward_context import ForwardContext
from mitk.model.norms import LayerNorm, RMSNorm, make_norm
from mitk.model.rwkv.channel_mix import ChannelMixer
from mitk.model.rwkv.state import RWKVState
from mitk.model.rwkv.time_mix import STATES_PATH, WKV_PATH, TimeMixer
from mitk.model.rwkv.wkv import WKVStates
from mitk.model.ssm.mixer import padding_mask
from mitk.shapes import Float


def rwkv_norm(cfg: TransformerConfig, layer: int, eps: float | None = None) -> LayerNorm | RMSNorm:
    """The norm reading the stream entering ``layer`` (``n_layers``: the final norm), its
    epsilon ``eps`` (None: ``cfg.norm_eps``) scaled as ``RWKVConfig.rescale_every`` says."""
    assert cfg.rwkv is not None
    norm = make_norm(cfg)
    norm.eps = cfg.rwkv.norm_eps(cfg.norm_eps if eps is None else eps, layer)
    return norm


class RWKVBlock(nn.Module):
    """Pre-norm RWKV-4 block: time mixing (``mixer``) then channel mixing (``mlp``).

    Hooks: ``hook_resid_pre``, ``ln1.*``, the time mixer's (``mixer.hook_*``, see
    ``TimeMixer``), ``hook_mixer_out`` (its write), ``hook_resid_mid``, ``ln2.*``, the
    channel mixer's (``mlp.hook_*``, see ``ChannelMixer``), ``hook_mlp_out`` (its write)
    and ``hook_resid_post``. Asking it for ``attn`` (an attention analysis of this layer)
    raises ``UnsupportedModelError`` naming the layer kind.

    Padding (``ctx.mask.key_valid``) zeroes both mixers' inputs at padded positions and
    keeps their keys out of the WKV state, so a left-padded prompt reads as if alone.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = rwkv_norm(cfg, layer)
        self.mixer = TimeMixer(cfg, layer)
        self.ln2 = rwkv_norm(cfg, layer)
        self.mlp = ChannelMixer(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_mixer_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """One block; ``ctx`` carries the padding mask and any past state."""
        valid = padding_mask(ctx, resid.shape[1], resid.dtype)
        past = ctx.past.get(self.layer)
        if past is not None and not isinstance(past, RWKVState):
            raise TypeError(f"layer {self.layer} is an RWKV layer; its past state is {type(past)}")
        resid = self.hook_resid_pre(resid)
        x = self._masked(self.ln1(resid), valid)
        state = None if past is None else WKVStates(*past.wkv.unbind(-1))
        keeps = self.mixer.hook_wkv_state.has_hooks
        ctx.record_path(self.mixer.name, STATES_PATH if keeps else WKV_PATH)
        mixer_out, last_state = self.mixer(x, valid, None if past is None else past.shift[:, 0],
                                           state)  # fmt: skip
        mid = self.hook_resid_mid(resid + self.hook_mixer_out(mixer_out))
        y = self._masked(self.ln2(mid), valid)
        mlp_out = self.hook_mlp_out(self.mlp(y, None if past is None else past.shift[:, 1]))
        if ctx.present is not None:
            shift = torch.stack([x[:, -1], y[:, -1]], 1)
            ctx.present[self.layer] = RWKVState(shift, torch.stack(last_state, -1))
        return self.hook_resid_post(mid + mlp_out)

    @staticmethod
    def _masked(x: Tensor, valid: Tensor | None) -> Tensor:
        return x if valid is None else x * valid

    @torch.no_grad()
    def init_rwkv_parameters(self) -> None:
        """RWKV-4's init of the decays, bonuses and token-shift mixes (see the mixers)."""
        self.mixer.init_rwkv_parameters(self.cfg.n_layers)
        self.mlp.init_rwkv_parameters(self.cfg.n_layers)

    @property
    def attn(self) -> NoReturn:
        """Refused: an RWKV layer has no attention (no heads, patterns or QK/OV circuits)."""
        raise UnsupportedModelError(
            f"layer {self.layer} is an RWKV (time-mixing) layer: it has no attention heads, "
            f"patterns or QK/OV circuits; its writes are blocks.{self.layer}.hook_mixer_out "
            f"and blocks.{self.layer}.hook_mlp_out"
        )
