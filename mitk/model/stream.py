"""A decoder-only model's residual-stream writes, as the cache and DLA read them."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.cache import StreamWrites
from mitk.errors import UnsupportedModelError
from mitk.hooks import name

POST_NORM = (
    "residual-stream decompositions and DLA need a pre-norm model; this one is post-norm "
    "(each block renormalises the stream), so writes do not add up"
)
SANDWICH_NORMS = (
    "this model has sandwich norms (Gemma-2; OLMo 2's post-norms too): ln1_post/ln2_post "
    "normalise each sublayer's output, so "
    "hook_attn_out and hook_mlp_out are not sums of head or neuron writes"
)


def decoder_stream_writes(model: Any) -> StreamWrites:
    """The writes of a ``HookedTransformer``'s stream, with its output weights read live.

    With a norm right after the embeddings (``cfg.embed_norm``, BLOOM) the token
    and position embeddings are not additive writes; the one write before block 0
    is then their normed sum, read at ``blocks.0.hook_resid_pre``.
    """
    cfg = model.cfg
    if cfg.embed_norm:
        embedding_hooks: tuple[tuple[str, str], ...] = (("embed", name("resid_pre", 0)),)
    else:
        embedding_hooks = (("embed", "hook_embed"),)
        if "hook_pos_embed" in model.hook_dict:
            embedding_hooks += (("pos_embed", "hook_pos_embed"),)
    blocks = model.blocks

    def head_output(layer: int) -> tuple[Tensor, Tensor]:
        attn = blocks[layer].attn
        return attn.W_O, attn.b_O

    moe_layers = tuple(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))

    def neuron_output(layer: int) -> tuple[Tensor, Tensor]:
        if cfg.rwkv is not None:
            raise UnsupportedModelError(
                f"layer {layer} is an RWKV layer: channel mixing gates its summed write with "
                f"sigmoid(receptance), so a neuron's write is not post * W_out; its write is "
                f"blocks.{layer}.hook_mlp_out"
            )
        if layer in moe_layers:
            raise UnsupportedModelError(
                f"layer {layer}'s MLP is a mixture of experts: its writes are per expert "
                "(by='expert', cache['expert_out', layer]), not per neuron"
            )
        mlp = blocks[layer].mlp
        bias = mlp.b_out if mlp.b_out is not None else mlp.W_out.new_zeros(mlp.W_out.shape[1])
        return mlp.W_out, bias

    expert_output = _expert_output(blocks)
    # RWKV's channel mixing, or an ordinary MLP after each Mamba mixer (hybrids such as Bamba)
    mixer_mlp = cfg.rwkv is not None or (cfg.ssm is not None and cfg.ssm.mlp)
    return StreamWrites(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        has_mlp=cfg.has_mlp,
        layernorm=cfg.normalization == "layernorm",
        embedding_hooks=embedding_hooks,
        head_output=head_output,
        neuron_output=neuron_output,
        not_additive=POST_NORM if cfg.norm_position == "post" else None,
        not_per_unit=SANDWICH_NORMS if cfg.sandwich_norms else None,
        moe_layers=moe_layers,
        expert_output=expert_output,
        mlp_reads="resid_pre" if cfg.parallel_attn_mlp else "resid_mid",
        mixer_layers=tuple(i for i in range(cfg.n_layers) if cfg.has_mixer(i)),
        mixer_writes=("mixer_out", "mlp_out") if mixer_mlp else ("mixer_out",),
        mixer_neurons=mixer_mlp and cfg.rwkv is None,
        mixer_kind="RWKV" if cfg.rwkv is not None else "state-space",
    )


def _expert_output(blocks: Any) -> Any:
    """Per-expert writes of block ``layer`` from the stream its MLP read and its routing."""

    def expert_output(layer: int, stream_in: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        block = blocks[layer]
        return block.mlp.expert_writes(block.mlp_input(stream_in), indices, weights)

    return expert_output
