"""T5 encoder and decoder blocks: pre-RMSNorm sublayers writing into the residual stream.

Decoder residual hooks, in order: ``hook_resid_pre`` -> self-attention ->
``hook_resid_mid`` -> cross-attention -> ``hook_resid_mid_cross`` -> MLP ->
``hook_resid_post``. Additions are out of place so a cached stream never changes.
"""

from __future__ import annotations

from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.forward_context import ForwardContext
from mitk.model.mlp import MLP
from mitk.model.norms import RMSNorm
from mitk.model.t5_attention import RelativePositionBias, T5Attention
from mitk.shapes import Float

Stream = Float[Tensor, "batch pos d_model"]
# The stack's shared score biases live in the pass's ForwardContext: built once per pass.
SELF_BIAS = "t5_self_bias"
CROSS_BIAS = "t5_cross_bias"


class T5EncoderBlock(nn.Module):
    """Bidirectional self-attention then MLP; hooks as in ``TransformerBlock``.

    Layer 0 also holds the stack's relative position table (``rel_pos.W_rel``).
    """

    def __init__(self, cfg: TransformerConfig, rel_pos: RelativePositionBias | None) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.ln1 = RMSNorm(cfg)
        self.attn = T5Attention(cfg.d_model, cfg.n_heads, cfg.d_head)
        self.rel_pos = rel_pos
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self._add_cross_attention(cfg)
        self.ln2 = RMSNorm(cfg)
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: Stream, ctx: ForwardContext) -> Stream:
        """One block; ``ctx.memo`` holds the stack's shared score bias (positions and padding)."""
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), ctx.memo[SELF_BIAS], ctx))
        mid = self._cross(self.hook_resid_mid(resid + attn_out), ctx)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mid)))
        return self.hook_resid_post(mid + mlp_out)

    def _cross(self, mid: Stream, ctx: ForwardContext) -> Stream:
        """The encoder has no cross-attention: the stream passes through."""
        return mid

    def _add_cross_attention(self, cfg: TransformerConfig) -> None:
        """Nothing in the encoder; the decoder adds its cross-attention here (hook order)."""


class T5DecoderBlock(T5EncoderBlock):
    """Causal self-attention, cross-attention to the encoder output, then MLP.

    Extra hooks: ``ln_cross.*``, ``cross_attn.hook_*`` (keys/values over encoder
    positions), ``hook_cross_attn_out`` and ``hook_resid_mid_cross``.
    """

    def _add_cross_attention(self, cfg: TransformerConfig) -> None:
        # registered between resid_mid and ln2 so hook_dict lists hooks in forward order
        self.ln_cross = RMSNorm(cfg)
        self.cross_attn = T5Attention(cfg.d_model, cfg.n_heads, cfg.d_head)
        self.hook_cross_attn_out = HookPoint()
        self.hook_resid_mid_cross = HookPoint()

    def _cross(self, mid: Stream, ctx: ForwardContext) -> Stream:
        """Cross-attention to ``ctx.cross`` (the encoder output), padded positions hidden."""
        if ctx.cross is None:
            raise ValueError("the decoder stack needs encoder_out")
        cross = self.cross_attn(self.ln_cross(mid), ctx.memo[CROSS_BIAS], ctx, ctx.cross)
        return self.hook_resid_mid_cross(mid + self.hook_cross_attn_out(cross))
