"""A state-space block: one mixer writing into the stream, ``resid + mixer(ln1(resid))``."""

from __future__ import annotations

from typing import NoReturn

from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.hooks import HookPoint
from mitk.model.forward_context import ForwardContext
from mitk.model.norms import make_norm
from mitk.model.ssm.mamba2 import Mamba2Mixer
from mitk.model.ssm.mixer import MambaMixer
from mitk.shapes import Float


class MambaBlock(nn.Module):
    """Pre-norm Mamba block: no attention, no MLP; the mixer's write is ``hook_mixer_out``.

    Hooks: ``hook_resid_pre``, ``ln1.hook_scale``/``hook_normalized``, the mixer's
    (``mixer.hook_*``, see ``MambaMixer`` and ``Mamba2Mixer``), ``hook_mixer_out`` and
    ``hook_resid_post``.
    Asking it for ``attn`` or ``mlp`` (an attention or neuron analysis of this
    layer) raises ``UnsupportedModelError`` naming the layer kind.
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
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """One block; ``ctx`` carries the padding mask and any past state to the mixer."""
        resid = self.hook_resid_pre(resid)
        mixer_out = self.hook_mixer_out(self.mixer(self.ln1(resid), ctx))
        return self.hook_resid_post(resid + mixer_out)

    @property
    def attn(self) -> NoReturn:
        """Refused: a state-space layer has no attention (no heads, patterns or QK/OV circuits)."""
        raise UnsupportedModelError(
            f"layer {self.layer} is a Mamba (selective state-space) layer: it has no attention "
            f"heads, patterns or QK/OV circuits; its write is blocks.{self.layer}.hook_mixer_out"
        )

    @property
    def mlp(self) -> NoReturn:
        """Refused: a state-space layer has no MLP neurons."""
        raise UnsupportedModelError(
            f"layer {self.layer} is a Mamba (selective state-space) layer: it has no MLP "
            f"neurons; its write is blocks.{self.layer}.hook_mixer_out"
        )
