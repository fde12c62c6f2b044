"""Residual-stream decompositions read from a cache and the model's weights.

Every write into the residual stream is additive, so the stream at any point is
the sum of the embeddings and the outputs of the sublayers before it. Per-head
and per-neuron writes are derived here, on demand, from ``hook_z`` and ``W_O``
and from ``hook_post`` and ``W_out``: the forward never materialises them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mitk.cache.residual_stack import ResidualStack
from mitk.errors import UnsupportedModelError
from mitk.hooks import name
from mitk.shapes import Float

if TYPE_CHECKING:
    from mitk.cache.activation_cache import ActivationCache


def _layers_before(cache: ActivationCache, layer: int | None) -> int:
    n = int(cache.model.cfg.n_layers)
    if layer is None:
        return n
    if not 0 <= layer <= n:
        raise ValueError(f"layer={layer} is outside [0, {n}] for a {n}-layer model")
    return layer


def embedding_writes(model: Any) -> list[tuple[str, str]]:
    """``(label, hook name)`` of each write into the stream before block 0.

    With a norm right after the embeddings (``cfg.embed_norm``, BLOOM) the
    token and position embeddings are not additive writes; the one write is
    the normed sum, read at ``blocks.0.hook_resid_pre``.
    """
    require_additive_stream(model)
    if model.cfg.embed_norm:
        return [("embed", name("resid_pre", 0))]
    writes = [("embed", "hook_embed")]
    if "hook_pos_embed" in model.hook_dict:
        writes.append(("pos_embed", "hook_pos_embed"))
    return writes


def require_additive_stream(model: Any) -> None:
    """Refuse post-norm models, whose stream is renormalised inside every block.

    There (BERT) a block's output is not its input plus its sublayers' writes,
    so decompositions and direct logit attribution would be wrong numbers.
    """
    if model.cfg.norm_position == "post":
        raise UnsupportedModelError(
            "residual-stream decompositions and DLA need a pre-norm model; this one is "
            "post-norm (each block renormalises the stream), so writes do not add up"
        )


def _require_unnormed_sublayers(model: Any, what: str) -> None:
    """Refuse per-head/neuron writes where a sandwich norm (Gemma-2) rescales the sublayer's sum."""
    if model.cfg.sandwich_norms:
        raise UnsupportedModelError(
            f"{what} writes do not exist on a model with sandwich norms (Gemma-2): "
            "ln1_post/ln2_post normalise each sublayer's output, so hook_attn_out and "
            "hook_mlp_out are not sums of head or neuron writes"
        )


def _has_mlp(model: Any) -> bool:
    return bool(model.cfg.has_mlp)


def decompose_resid(cache: ActivationCache, layer: int | None = None) -> ResidualStack:
    """Embeddings plus each attention and MLP output before ``layer`` (None: the final stream).

    The components sum to ``blocks.{layer}.hook_resid_pre`` (or the last
    ``hook_resid_post``). Sublayer outputs include their biases.
    """
    end = _layers_before(cache, layer)
    writes = embedding_writes(cache.model)
    labels, parts = [label for label, _ in writes], [cache[hook] for _, hook in writes]
    for block in range(end):
        labels.append(f"{block}_attn_out")
        parts.append(cache[name("attn_out", block)])
        if _has_mlp(cache.model):
            labels.append(f"{block}_mlp_out")
            parts.append(cache[name("mlp_out", block)])
    return ResidualStack(torch.stack([p.expand_as(parts[0]) for p in parts]), labels)


def head_results(cache: ActivationCache, layer: int) -> Float[Tensor, "head batch pos d_model"]:
    """What each head of ``layer`` writes into the stream: ``z[:, :, h] @ W_O[h]`` (no bias)."""
    _require_unnormed_sublayers(cache.model, "per-head")
    z = cache[name("z", layer)]
    W_O = cache.model.blocks[layer].attn.W_O
    return torch.einsum("bphd,hdm->hbpm", z, W_O)


def stack_head_results(cache: ActivationCache, layer: int | None = None) -> ResidualStack:
    """One write per head (``L{l}H{h}``) for layers before ``layer``, plus each layer's ``b_O``.

    Per layer, the heads and ``L{l}_attn_bias`` sum to ``blocks.{l}.hook_attn_out``.
    """
    end = _layers_before(cache, layer)
    labels: list[str] = []
    parts: list[Tensor] = []
    for block in range(end):
        heads = head_results(cache, block)
        parts.append(heads)
        bias = cache.model.blocks[block].attn.b_O
        parts.append(bias.expand_as(heads[0])[None])
        labels += [f"L{block}H{h}" for h in range(heads.shape[0])] + [f"L{block}_attn_bias"]
    if not parts:
        raise ValueError("layer=0 leaves no heads to stack")
    return ResidualStack(torch.cat(parts), labels)


def stack_neuron_results(
    cache: ActivationCache, layer: int, neurons: list[int] | Tensor | None = None
) -> ResidualStack:
    """Per-neuron writes of ``layer``'s MLP (``L{l}N{n}``) and its output bias ``L{l}_mlp_bias``.

    With ``neurons=None`` every neuron is included and the stack sums to
    ``blocks.{l}.hook_mlp_out``. Memory is ``n_neurons * batch * pos * d_model``:
    select neurons for large models.
    """
    if not _has_mlp(cache.model):
        raise ValueError("this model is attention-only: it has no neurons")
    _require_unnormed_sublayers(cache.model, "per-neuron")
    mlp = cache.model.blocks[layer].mlp
    post = cache[name("post", layer)]
    index = torch.arange(post.shape[-1]) if neurons is None else torch.as_tensor(neurons)
    writes = torch.einsum("bpn,nm->nbpm", post[..., index], mlp.W_out[index])
    bias = mlp.b_out if mlp.b_out is not None else mlp.W_out.new_zeros(mlp.W_out.shape[1])
    labels = [f"L{layer}N{int(n)}" for n in index] + [f"L{layer}_mlp_bias"]
    return ResidualStack(torch.cat([writes, bias.expand_as(writes[0])[None]]), labels)


def accumulated_resid(cache: ActivationCache, layer: int | None = None) -> ResidualStack:
    """Snapshots of the stream entering each block up to ``layer`` (None adds the final one).

    Labels ``"0_pre"``, ``"1_pre"``, ... and ``"final_post"``: the input to a
    logit lens.
    """
    end = _layers_before(cache, layer)
    n_layers = int(cache.model.cfg.n_layers)
    labels = [f"{block}_pre" for block in range(min(end + 1, n_layers))]
    parts = [cache[name("resid_pre", block)] for block in range(len(labels))]
    if end == n_layers:
        labels.append("final_post")
        parts.append(cache[name("resid_post", n_layers - 1)])
    return ResidualStack(torch.stack(parts), labels)


def norm_scale(cache: ActivationCache, layer: int | None) -> Float[Tensor, "batch pos 1"]:
    """The cached scale of the norm reading the stream at ``layer`` (None: the final norm)."""
    return cache[name("scale", layer, "ln1") if layer is not None else name("scale")]


def apply_ln_to_stack(
    cache: ActivationCache, stack: ResidualStack, layer: int | None = None
) -> ResidualStack:
    """Push each component through the norm at ``layer`` as the forward did, linearly.

    Centres each component (LayerNorm) and divides by the scale the norm
    computed on the whole stream in this forward (``hook_scale`` must be
    cached). The elementwise weight and bias are not applied, so the result
    sums to that norm's ``hook_normalized``.
    """
    require_additive_stream(cache.model)
    scale = norm_scale(cache, layer)
    tensor = stack.tensor
    if cache.model.cfg.normalization == "layernorm":
        tensor = tensor - tensor.mean(-1, keepdim=True)
    return ResidualStack(tensor / scale, stack.labels)
