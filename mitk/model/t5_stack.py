"""One T5 stack (encoder or decoder): embedding hook, numbered blocks, final RMSNorm.

Blocks are registered as children ``"0"``, ``"1"``, ... so the hook names read
``encoder.{L}.hook_resid_pre`` and ``decoder.{L}.cross_attn.hook_pattern``.
The score bias (relative positions from layer 0's table, plus padding and
causality as -inf) is built once per forward and shared by every layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from mitk.config import AttentionBackend
from mitk.hooks import HookPoint
from mitk.model.encoder_decoder_config import EncoderDecoderConfig
from mitk.model.executor import run_blocks
from mitk.model.forward_context import ForwardContext
from mitk.model.masks import AttentionMask
from mitk.model.norms import RMSNorm
from mitk.model.t5_attention import RelativePositionBias, T5Attention, score_bias
from mitk.model.t5_block import CROSS_BIAS, SELF_BIAS, T5DecoderBlock, T5EncoderBlock
from mitk.shapes import Bool, Float


class T5Stack(nn.Module):
    """The encoder (``causal=False``) or decoder (``causal=True``) of a T5 model.

    Hooks: ``hook_embed`` (the token embeddings entering block 0), the blocks'
    hooks, and ``ln_final.hook_scale|hook_normalized``.
    """

    def __init__(self, cfg: EncoderDecoderConfig, causal: bool) -> None:
        super().__init__()
        block_cfg = cfg.block_config()
        self.causal = causal
        self.hook_embed = HookPoint()
        n_layers = cfg.n_decoder_layers if causal else cfg.n_layers
        for layer in range(n_layers):
            rel_pos = (
                RelativePositionBias(
                    cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance, causal
                )
                if layer == 0  # T5: only the first layer owns the table; the rest reuse its bias
                else None
            )
            block_cls = T5DecoderBlock if causal else T5EncoderBlock
            self.add_module(str(layer), block_cls(block_cfg, rel_pos))
        self.ln_final = RMSNorm(block_cfg)

    @property
    def blocks(self) -> list[T5EncoderBlock]:
        """The blocks in order (decoder blocks are ``T5DecoderBlock``)."""
        return [m for m in self.children() if isinstance(m, T5EncoderBlock)]

    def attentions(self) -> dict[str, T5Attention]:
        """Every attention layer by its path under this stack (``"0.attn"``, ``"0.cross_attn"``)."""
        return {path: m for path, m in self.named_modules() if isinstance(m, T5Attention)}

    def forward_context(
        self,
        q_len: int,
        key_valid: Bool[Tensor, "batch pos"] | None,
        backend: AttentionBackend = "auto",
        encoder_out: Float[Tensor, "batch enc_pos d_model"] | None = None,
        encoder_valid: Bool[Tensor, "batch enc_pos"] | None = None,
    ) -> ForwardContext:
        """The context of one pass through this stack (the decoder also needs ``encoder_out``).

        ``key_valid``/``encoder_valid`` are True at real tokens (None: no padding).
        """
        mask = AttentionMask(self.causal, q_len, q_len, key_valid)
        return ForwardContext(
            mask=mask, backend=backend, cross=encoder_out, cross_valid=encoder_valid
        )

    def forward(
        self, embedded: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Every block, then the final norm, over one pass described by ``ctx``."""
        resid = self.hook_embed(embedded)
        device, mask = resid.device, ctx.mask
        first = self.blocks[0]
        assert first.rel_pos is not None  # built so in __init__
        # padded queries may see themselves (AttentionMask's rule), so no softmax row is empty
        allowed = mask.dense(device) if mask.restricts() else None
        ctx.memo[SELF_BIAS] = score_bias(first.rel_pos(mask.q_len, mask.k_len), allowed)
        valid = ctx.cross_valid
        cross = None if valid is None else score_bias(None, valid.to(device)[:, None, None, :])
        ctx.memo[CROSS_BIAS] = cross
        return self.ln_final(run_blocks(self.blocks, resid, ctx))
