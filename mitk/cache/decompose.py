"""Residual-stream decompositions read from a cache and the model's weights.

Every write into the residual stream is additive, so the stream at any point is
the sum of the embeddings and the outputs of the sublayers before it. Per-head
and per-neuron writes are derived here, on demand, from ``hook_z`` and ``W_O``
and from ``hook_post`` and ``W_out``: the forward never materialises them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mitk.cache.residual_stack import ResidualStack
from mitk.cache.writes import head_writes, neuron_writes, output_bias
from mitk.hooks import name
from mitk.shapes import Float

if TYPE_CHECKING:
    from mitk.cache.activation_cache import ActivationCache


def _layers_before(cache: ActivationCache, layer: int | None) -> int:
    n = cache.stream.n_layers
    if layer is None:
        return n
    if not 0 <= layer <= n:
        raise ValueError(f"layer={layer} is outside [0, {n}] for a {n}-layer model")
    return layer


def decompose_resid(cache: ActivationCache, layer: int | None = None) -> ResidualStack:
    """Embeddings plus each attention and MLP output before ``layer`` (None: the final stream).

    The components sum to ``blocks.{layer}.hook_resid_pre`` (or the last
    ``hook_resid_post``). Sublayer outputs include their biases.
    """
    stream = cache.stream
    stream.require_additive()
    end = _layers_before(cache, layer)
    labels = [label for label, _ in stream.embedding_hooks]
    parts = [cache[hook] for _, hook in stream.embedding_hooks]
    for block in range(end):
        labels.append(f"{block}_attn_out")
        parts.append(cache[name("attn_out", block)])
        if stream.has_mlp:
            labels.append(f"{block}_mlp_out")
            parts.append(cache[name("mlp_out", block)])
    return ResidualStack(torch.stack([p.expand_as(parts[0]) for p in parts]), labels)


def head_results(cache: ActivationCache, layer: int) -> Float[Tensor, "head batch pos d_model"]:
    """What each head of ``layer`` writes into the stream: ``z[:, :, h] @ W_O[h]`` (no bias)."""
    return head_writes(cache.stream, layer, cache[name("z", layer)])


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
        parts.append(output_bias(cache.stream, block, "attn").expand_as(heads[0])[None])
        labels += [f"L{block}H{h}" for h in range(heads.shape[0])] + [f"L{block}_attn_bias"]
    if not parts:
        raise ValueError("layer=0 leaves no heads to stack")
    return ResidualStack(torch.cat(parts), labels)


def stack_neuron_results(
    cache: ActivationCache, layer: int | None = None, neurons: list[int] | Tensor | None = None
) -> ResidualStack:
    """Per-neuron writes ``L{l}N{n}`` of every MLP before ``layer``, with each ``L{l}_mlp_bias``.

    As in TransformerLens, ``layer`` is exclusive (None: every layer), like
    ``stack_head_results``. With ``neurons=None`` every neuron is included and
    each layer's part sums to ``blocks.{l}.hook_mlp_out``; ``neurons`` picks the
    same indices in every layer. Memory is ``n_neurons * layers * batch * pos *
    d_model``: select neurons (or layers) for large models.
    """
    stream = cache.stream
    if not stream.has_mlp:
        raise ValueError("this model is attention-only: it has no neurons")
    end = _layers_before(cache, layer)
    labels: list[str] = []
    parts: list[Tensor] = []
    for block in range(end):
        post = cache[name("post", block)]
        writes = neuron_writes(stream, block, post, neurons)
        index = torch.arange(post.shape[-1]) if neurons is None else torch.as_tensor(neurons)
        parts += [writes, output_bias(stream, block, "mlp").expand_as(writes[0])[None]]
        labels += [f"L{block}N{int(n)}" for n in index] + [f"L{block}_mlp_bias"]
    if not parts:
        raise ValueError("layer=0 leaves no neurons to stack")
    return ResidualStack(torch.cat(parts), labels)


def accumulated_resid(cache: ActivationCache, layer: int | None = None) -> ResidualStack:
    """Snapshots of the stream entering each block up to ``layer`` (None adds the final one).

    Labels ``"0_pre"``, ``"1_pre"``, ... and ``"final_post"``: the input to a
    logit lens.
    """
    end = _layers_before(cache, layer)
    n_layers = cache.stream.n_layers
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
    cache.stream.require_additive()
    scale = norm_scale(cache, layer)
    tensor = stack.tensor
    if cache.stream.layernorm:
        tensor = tensor - tensor.mean(-1, keepdim=True)
    return ResidualStack(tensor / scale, stack.labels)
