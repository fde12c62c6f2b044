"""A state-space block: ``resid + mixer(ln1(resid))``, then in hybrids ``+ mlp(ln2(...))``."""

from __future__ import annotations

from typing import NoReturn, cast

from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.hooks import HookPoint
from mitk.model.forward_context import ForwardContext
from mitk.model.mlp import MLP
from mitk.model.norms import make_norm
from mitk.model.ssm.mamba2 import Mamba2Mixer
from mitk.model.ssm.mixer import MambaMixer
from mitk.shapes import Float


class MambaBlock(nn.Module):
    """Pre-norm Mamba block: no attention; the mixer's write is ``hook_mixer_out``.

    Hooks: ``hook_resid_pre``, ``ln1.hook_scale``/``hook_normalized``, the mixer's
    (``mixer.hook_*``, see ``MambaMixer`` and ``Mamba2Mixer``), ``hook_mixer_out`` and
    ``hook_resid_post``. With ``cfg.ssm.mlp`` (hybrids such as Bamba) an MLP follows the
    mixer as in a transformer block: ``hook_resid_mid`` (the stream after the mixer),
    ``ln2.*``, ``mlp.hook_pre``/``hook_pre_linear``/``hook_post`` and ``hook_mlp_out``.
    Asking it for ``attn`` (an attention analysis of this layer), or for ``mlp`` where it
    has none, raises ``UnsupportedModelError`` naming the layer kind.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = make_norm(cfg)
        assert cfg.ssm is not None
        mixer = Mamba2Mixer if cfg.ssm.variant == "mamba2" else MambaMixer
        self.mixer: MambaMixer | Mamba2Mixer = mixer(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_mixer_out = HookPoint()
        self.has_mlp = cfg.ssm.mlp
        if self.has_mlp:
            self.hook_resid_mid = HookPoint()
            self.ln2 = make_norm(cfg)
            # what add_module does, minus its check that refuses a name a property holds:
            # the ``mlp`` property below returns this module (or refuses where there is none)
            self._modules["mlp"] = MLP(cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """One block; ``ctx`` carries the padding mask and any past state to the mixer."""
        resid = self.hook_resid_pre(resid)
        mixer_out = self.hook_mixer_out(self.mixer(self.ln1(resid), ctx))
        if not self.has_mlp:
            return self.hook_resid_post(resid + mixer_out)
        mid = self.hook_resid_mid(resid + mixer_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mid)))
        return self.hook_resid_post(mid + mlp_out)

    @property
    def attn(self) -> NoReturn:
        """Refused: a state-space layer has no attention (no heads, patterns or QK/OV circuits)."""
        raise UnsupportedModelError(
            f"layer {self.layer} is a Mamba (selective state-space) layer: it has no attention "
            f"heads, patterns or QK/OV circuits; its write is blocks.{self.layer}.hook_mixer_out"
            + (f" (then its MLP's, blocks.{self.layer}.hook_mlp_out)" if self.has_mlp else "")
        )

    @property
    def mlp(self) -> MLP:
        """The MLP after the mixer (``cfg.ssm.mlp``); refused where the layer has none."""
        if self.has_mlp:
            return cast(MLP, self._modules["mlp"])
        raise UnsupportedModelError(
            f"layer {self.layer} is a Mamba (selective state-space) layer: it has no MLP "
            f"neurons; its write is blocks.{self.layer}.hook_mixer_out"
        )
