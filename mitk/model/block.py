"""One transformer block: the residual stream and the two sublayers that write into it."""

from __future__ import annotations

from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.attention import Attention, Backend, PastKV
from mitk.model.masks import AttentionMask
from mitk.model.mlp import MLP
from mitk.model.norms import make_norm
from mitk.shapes import Float


class TransformerBlock(nn.Module):
    """Pre-norm block; sequential (``resid_mid`` between sublayers) or parallel attention+MLP.

    The residual additions are out of place on purpose: a cached ``resid_pre``
    must not change when the block later adds into the stream.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if cfg.has_mlp:
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()
            self.ln2 = make_norm(cfg)
            self.mlp = MLP(cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        backend: Backend = "auto",
        past_kv: PastKV | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """One block; ``past_kv`` (keys/values of earlier positions) goes to the attention."""
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), mask, backend, past_kv))
        if not self.cfg.has_mlp:
            return self.hook_resid_post(resid + attn_out)
        if self.cfg.parallel_attn_mlp:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid)))
            return self.hook_resid_post(resid + attn_out + mlp_out)
        mid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mid)))
        return self.hook_resid_post(mid + mlp_out)
