"""One transformer block: the residual stream and the two sublayers that write into it."""

from __future__ import annotations

from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.attention import Attention
from mitk.model.block_sparse_attention import BlockSparseAttention
from mitk.model.forward_context import ForwardContext
from mitk.model.latent_attention import LatentAttention
from mitk.model.linear_attention import LinearAttention, PerformerAttention
from mitk.model.longformer_attention import LongformerAttention
from mitk.model.mlp import MLP
from mitk.model.moe import MixtureOfExperts
from mitk.model.norms import make_norm
from mitk.model.nystrom_attention import NystromAttention
from mitk.model.rwkv import RWKVBlock
from mitk.model.ssm import MambaBlock
from mitk.shapes import Float


def block_class(cfg: TransformerConfig, layer: int) -> type[nn.Module]:
    """The block ``layer`` is built from: RWKV, Mamba (a state-space mixer) or attention + MLP."""
    if cfg.rwkv is not None:
        return RWKVBlock
    return MambaBlock if cfg.is_ssm_layer(layer) else TransformerBlock


class TransformerBlock(nn.Module):
    """Pre-norm block; sequential (``resid_mid`` between sublayers) or parallel attention+MLP.

    The residual additions are out of place on purpose: a cached ``resid_pre``
    must not change when the block later adds into the stream.

    Post-norm (``cfg.norm_position == "post"``, BERT) keeps TransformerLens's
    ``BertBlock`` hooks: ``hook_resid_pre`` is the (normed) block input,
    ``hook_resid_mid = resid_pre + attn_out`` and ``hook_resid_post =
    ln1(resid_mid) + mlp_out`` are taken *before* their norms (``ln1``, ``ln2``),
    and the block's output ``ln2(resid_post)`` is ``hook_normalized_resid_post``,
    which equals the next block's ``hook_resid_pre``.

    Sandwich norms (``cfg.sandwich_norms``, Gemma-2) normalise each sublayer's
    output with ``ln1_post``/``ln2_post`` before the residual addition, as
    TransformerLens does; ``hook_attn_out``/``hook_mlp_out`` see the normed
    write, so they are no longer the sum of per-head or per-neuron writes.

    Without pre-norms (``cfg.pre_norms`` False, OLMo 2) the block has no
    ``ln1``/``ln2``: each sublayer reads the raw stream and only its output is
    normed (``ln1_post``/``ln2_post``).
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        if cfg.pre_norms:
            self.ln1 = make_norm(cfg)
        kinds = {"mla": LatentAttention, "linear": LinearAttention, "performer": PerformerAttention}
        attn_class = kinds.get(cfg.attention_type, Attention)
        if cfg.nystrom is not None:
            attn_class = NystromAttention
        if cfg.block_sparse is not None:
            attn_class = BlockSparseAttention
        if cfg.longformer is not None:
            attn_class = LongformerAttention
        self.attn = attn_class(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if cfg.has_mlp:
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()
            if cfg.pre_norms:
                self.ln2 = make_norm(cfg)
            self.mlp = MixtureOfExperts(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if cfg.norm_position == "post":
            self.hook_normalized_resid_post = HookPoint()
        if cfg.sandwich_norms:  # Gemma-2: each sublayer's output is normed before it is added
            self.ln1_post = make_norm(cfg)
            self.ln2_post = make_norm(cfg)

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """One block; ``ctx`` carries the mask, backend and any past state to the attention."""
        resid = self.hook_resid_pre(resid)
        if self.cfg.norm_position == "post":
            return self._post_norm(resid, ctx)
        attn_out = self.attn(self._pre(1, resid), ctx)
        if self.cfg.sandwich_norms:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        if not self.cfg.has_mlp:
            return self.hook_resid_post(resid + attn_out)
        if self.cfg.parallel_attn_mlp:
            mlp_out = self.hook_mlp_out(self.mlp(self._pre(2, resid)))
            return self.hook_resid_post(resid + attn_out + mlp_out)
        mid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.mlp(self._pre(2, mid))
        if self.cfg.sandwich_norms:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(mid + mlp_out)

    def mlp_input(
        self, x: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The MLP's input given the stream it reads (``resid_mid``; ``resid_pre`` if parallel)."""
        return self._pre(2, x)

    def _pre(
        self, which: int, x: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """What sublayer ``which`` (1: attention, 2: MLP) reads: ``ln{which}(x)``, or ``x``."""
        return getattr(self, f"ln{which}")(x) if self.cfg.pre_norms else x

    def _post_norm(
        self, resid: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """``x = ln1(x + attn(x)); x = ln2(x + mlp(x))`` (config validation ensures an MLP)."""
        attn_out = self.hook_attn_out(self.attn(resid, ctx))
        normed_mid = self.ln1(self.hook_resid_mid(resid + attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(normed_mid))
        post = self.hook_resid_post(normed_mid + mlp_out)
        return self.hook_normalized_resid_post(self.ln2(post))
