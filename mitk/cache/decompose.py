"""Residual-stream decompositions read from a cache and the model's weights.

Every write into the residual stream is additive, so the stream entering any
layer is the sum of the embeddings and the outputs of the sublayers before it.
Per-head and per-neuron writes are derived here, on demand, from ``hook_z`` and
``W_O`` and from ``hook_post`` and ``W_out`` (``mitk.cache.writes``): the
forward never materialises them.

Each function returns ``(components, labels)`` with TransformerLens's meanings
and label spellings; ``components`` is ``[component, *lead, d_model]`` where
``*lead`` is ``batch pos`` less whatever the cache or ``pos_slice`` dropped.
``layer`` is a stream position in ``[0, n_layers]`` (see ``selection``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mitk.cache.errors import CacheArgumentError
from mitk.cache.norm import apply_ln_to_stack, cached_scale
from mitk.cache.selection import (
    SliceLike,
    as_kept_slice,
    as_slice,
    block_index,
    resolve_layer,
)
from mitk.cache.writes import StreamWrites, neuron_writes, output_bias
from mitk.errors import UnsupportedModelError
from mitk.hooks import name
from mitk.shapes import Float
from mitk.utils import Slice

if TYPE_CHECKING:
    from mitk.cache.activation_cache import ActivationCache

Components = tuple[Tensor, list[str]]
MODES = ("all", "mlp", "attn")


def _no_mlp_at_unembed(
    mlp_input: bool, end: int, n_layers: int, mixer_layers: tuple[int, ...] = ()
) -> None:
    if mlp_input and end in mixer_layers:
        raise UnsupportedModelError(
            f"mlp_input=True reads the input of layer {end}'s MLP, but layer {end} is a "
            "state-space (Mamba) layer: it has one mixer and no MLP"
        )
    if mlp_input and end == n_layers:
        raise CacheArgumentError(
            f"mlp_input=True reads the input of layer {end}'s MLP, but layer {end} is the "
            "unembed; pass a layer below n_layers"
        )


def _empty(cache: ActivationCache, pos: Slice, width: int | None = None) -> Tensor:
    """A ``[0, *lead, width]`` stack (width: d_model) so an empty result still stacks."""
    like = pos.apply(cache[cache.stream.embedding_hooks[0][1]], dim=-2)
    shape = (*like.shape[:-1], like.shape[-1] if width is None else width)
    return like.new_zeros((0, *shape))


def stream_entering(cache: ActivationCache, layer: int) -> Float[Tensor, "*lead d_model"]:
    """The residual stream entering stream position ``layer`` (``n_layers``: the final stream)."""
    if layer == 0:
        return cache[name("resid_pre", 0)]
    return cache[name("resid_post", layer - 1)]


def accumulated_resid(
    cache: ActivationCache,
    layer: int | None = None,
    incl_mid: bool = False,
    apply_ln: bool = False,
    pos_slice: SliceLike = None,
    mlp_input: bool = False,
) -> Components:
    """Snapshots of the stream entering each layer up to ``layer``: ``{l}_pre``, ``final_post``.

    ``incl_mid`` adds ``{l}_mid`` after each layer before ``layer``;
    ``mlp_input`` adds ``{layer}_mid``. ``apply_ln`` pushes the snapshots through
    the norm reading ``layer`` with its cached scale, except at the unembed,
    where (as TransformerLens does for a logit lens) the final norm is applied
    to each snapshot with its own statistics, weight and bias included.
    """
    n_layers = cache.stream.n_layers
    end = resolve_layer(layer, n_layers)
    mixers = cache.stream.mlp_less_layers
    _no_mlp_at_unembed(mlp_input, end, n_layers, mixers)
    pos = as_slice(pos_slice)
    labels: list[str] = []
    parts: list[Tensor] = []
    for block in range(end + 1):
        if block == n_layers:
            labels.append("final_post")
            parts.append(cache[name("resid_post", n_layers - 1)])
            continue
        labels.append(f"{block}_pre")
        parts.append(cache[name("resid_pre", block)])
        if block in mixers:  # one write per mixer block: no stream between sublayers
            continue
        if (incl_mid and block < end) or (mlp_input and block == end):
            labels.append(f"{block}_mid")
            parts.append(cache[name("resid_mid", block)])
    stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(
            cache, stack, end, mlp_input, pos_slice=pos, recompute_ln=end == n_layers
        )
    return stack, labels


def decompose_resid(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    mode: str = "all",
    apply_ln: bool = False,
    pos_slice: SliceLike = None,
    incl_embeds: bool = True,
) -> Components:
    """Embeddings and each sublayer's output before ``layer``: they sum to the stream there.

    Labels ``embed``, ``pos_embed`` (learned positions only), ``{l}_attn_out``,
    ``{l}_mlp_out``, and ``{l}_mixer_out`` for a state-space layer (``mode="all"``
    only: a mixer is neither attention nor MLP). ``mode`` keeps ``"attn"`` or
    ``"mlp"`` outputs only; ``mlp_input`` adds ``{layer}_attn_out`` (the stream
    entering that MLP). Sublayer outputs include their biases.
    """
    if mode not in MODES:
        raise CacheArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    stream = cache.stream
    stream.require_additive()
    end = resolve_layer(layer, stream.n_layers)
    _no_mlp_at_unembed(mlp_input, end, stream.n_layers, stream.mlp_less_layers)
    pos = as_slice(pos_slice)
    incl_attn, incl_mlp = mode != "mlp", mode != "attn" and stream.has_mlp
    labels: list[str] = []
    parts: list[Tensor] = []
    if incl_embeds:
        labels += [label for label, _ in stream.embedding_hooks]
        parts += [cache[hook] for _, hook in stream.embedding_hooks]
    for block in range(end + 1):
        if block in stream.mixer_layers:  # all of its writes, or the first before its MLP
            writes = stream.mixer_writes if block < end else stream.mixer_writes[:-1]
            for kind in writes if mode == "all" and (block < end or mlp_input) else ():
                labels.append(f"{block}_{kind}")
                parts.append(cache[name(kind, block)])
            continue
        if incl_attn and (block < end or mlp_input):
            labels.append(f"{block}_attn_out")
            parts.append(cache[name("attn_out", block)])
        if incl_mlp and block < end:
            labels.append(f"{block}_mlp_out")
            parts.append(cache[name("mlp_out", block)])
    if not parts:
        return _empty(cache, pos), labels
    stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, end, mlp_input, pos_slice=pos)
    return stack, labels


def stack_head_results(
    cache: ActivationCache,
    layer: int | None = None,
    incl_remainder: bool = False,
    pos_slice: SliceLike = None,
    apply_ln: bool = False,
    incl_bias: bool = False,
) -> Components:
    """One write per head (``L{l}H{h}``) of every layer before ``layer``.

    ``incl_remainder`` adds ``remainder``: the stream entering ``layer`` minus
    the heads (at ``layer=0``, the embeddings: TransformerLens returns the
    final stream there). ``incl_bias`` (mitk) adds ``L{l}_attn_bias`` after
    each layer's heads, so each layer's part sums to its ``hook_attn_out``.
    """
    stream = cache.stream
    end = resolve_layer(layer, stream.n_layers)
    pos = as_slice(pos_slice)
    labels: list[str] = []
    parts: list[Tensor] = []
    for block in range(end):
        heads = pos.apply(cache.head_results(block), dim=-3).movedim(-2, 0)
        labels += [f"L{block}H{h}" for h in range(heads.shape[0])]
        parts.append(heads)
        if incl_bias:
            labels.append(f"L{block}_attn_bias")
            parts.append(output_bias(stream, block, "attn").expand_as(heads[0])[None])
    stack = torch.cat(parts) if parts else _empty(cache, pos)
    if incl_remainder:
        stack, labels = _with_remainder(cache, stack, labels, end, pos)
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, end, pos_slice=pos)
    return stack, labels


def _with_remainder(
    cache: ActivationCache, stack: Tensor, labels: list[str], end: int, pos: Slice
) -> Components:
    rest = pos.apply(stream_entering(cache, end), dim=-2) - stack.sum(0)
    return torch.cat([stack, rest[None]]), [*labels, "remainder"]


def _projection(project: Tensor | None) -> tuple[Tensor | None, bool]:
    """``project`` as ``[d_model, outs]`` and whether to squeeze ``outs`` at the end (1-D)."""
    if project is None:
        return None, False
    if project.ndim == 1:
        return project[:, None], True
    if project.ndim != 2:
        raise CacheArgumentError(
            f"project_output_onto must be [d_model] or [d_model, n], got {tuple(project.shape)}"
        )
    return project, False


def _neurons_of(
    cache: ActivationCache, block: int, neurons: Slice, pos: Slice, project: Tensor | None = None
) -> Components:
    """Per-neuron writes ``[neuron, *lead, d_model]`` (neurons kept as a dim) and their labels.

    With ``project`` (``[d_model, outs]``) each write is projected without
    building the ``[neuron, *lead, d_model]`` intermediate: ``post * (W_out @ P)``.
    """
    post = pos.apply(cache[name("post", block)], dim=-2)
    index = torch.as_tensor(neurons.indices(post.shape[-1]), device=post.device)
    labels = [f"L{block}N{int(n)}" for n in index]
    if project is None:
        return neuron_writes(cache.stream, block, post, index), labels
    cache.stream.require_per_unit("per-neuron")  # as neuron_writes does
    W_out, _ = cache.stream.neuron_output(block)
    return torch.einsum("...n,no->n...o", post[..., index], W_out[index] @ project), labels


def _require_neurons(cache: ActivationCache) -> None:
    if not cache.stream.has_mlp:
        kind = cache.stream.mixer_kind if cache.stream.mixer_layers else "attention-only"
        raise UnsupportedModelError(f"this model is {kind}: it has no neurons")


def get_neuron_results(
    cache: ActivationCache,
    layer: int,
    neuron_slice: SliceLike = None,
    pos_slice: SliceLike = None,
    project_output_onto: Tensor | None = None,
) -> Tensor:
    """Each selected neuron's write at block ``layer``: ``[*lead, neuron, d_model]``.

    As in TransformerLens, an int ``neuron_slice`` drops the neuron dim, and
    ``project_output_onto`` (``[d_model]`` or ``[d_model, n]``) replaces the
    last dim by the projection (squeezed for a vector). Not stored in the cache.
    """
    _require_neurons(cache)
    block = block_index(layer, cache.stream.n_layers)
    neurons, pos = as_slice(neuron_slice, "neuron_slice"), as_slice(pos_slice)
    kept = as_kept_slice(neurons)
    project, squeeze = _projection(project_output_onto)
    writes = _neurons_of(cache, block, kept, pos, project)[0].movedim(0, -2)
    if neurons.mode == "int":
        writes = writes.squeeze(-2)
    return writes.squeeze(-1) if squeeze else writes


def stack_neuron_results(
    cache: ActivationCache,
    layer: int | None = None,
    pos_slice: SliceLike = None,
    neuron_slice: SliceLike = None,
    incl_remainder: bool = False,
    apply_ln: bool = False,
    project_output_onto: Tensor | None = None,
    incl_bias: bool = False,
    mlp_input: bool = False,
) -> Components:
    """Per-neuron writes ``L{l}N{n}`` of every MLP before ``layer`` (exclusive).

    ``neuron_slice`` picks the same neurons in every layer (an int keeps the
    dim). ``incl_remainder`` adds the stream entering ``layer`` minus the
    neurons; ``incl_bias`` (mitk) adds ``L{l}_mlp_bias`` after each layer, so
    with every neuron each layer's part sums to its ``hook_mlp_out``.
    ``project_output_onto`` projects each write (and the remainder) without
    building ``[neuron, *lead, d_model]``. Memory without it is ``neurons *
    layers * batch * pos * d_model``. ``mlp_input`` picks the norm ``apply_ln``
    uses (``ln2`` of ``layer``), for the full decomposition.
    """
    _require_neurons(cache)
    stream = cache.stream
    end = resolve_layer(layer, stream.n_layers)
    pos, neurons = as_slice(pos_slice), as_kept_slice(neuron_slice)
    project, squeeze = _projection(project_output_onto)
    if project is not None and incl_bias:
        raise CacheArgumentError("incl_bias adds d_model vectors; it cannot be projected")
    scale = None
    if project is not None and apply_ln:  # the norm is linear once its scale is fixed
        scale = cached_scale(cache, end, mlp_input, pos, None)
        if scale is not None and stream.layernorm:  # centre(x) @ P == x @ (P - mean_rows(P))
            project = project - project.mean(0, keepdim=True)
    labels: list[str] = []
    parts: list[Tensor] = []
    for block in range(end):
        writes, block_labels = _neurons_of(cache, block, neurons, pos, project)
        labels += block_labels
        parts.append(writes)
        if incl_bias:
            labels.append(f"L{block}_mlp_bias")
            parts.append(output_bias(stream, block, "mlp").expand_as(writes[0])[None])
    width = None if project is None else project.shape[-1]
    stack = torch.cat(parts) if parts else _empty(cache, pos, width)
    if project is None:
        if incl_remainder:
            stack, labels = _with_remainder(cache, stack, labels, end, pos)
        if apply_ln:
            stack = apply_ln_to_stack(cache, stack, end, mlp_input, pos_slice=pos)
    else:
        stack = stack if scale is None else stack / scale
        if incl_remainder:
            rest = pos.apply(stream_entering(cache, end), dim=-2) @ project
            rest = rest if scale is None else rest / scale
            stack, labels = torch.cat([stack, (rest - stack.sum(0))[None]]), [*labels, "remainder"]
    return (stack.squeeze(-1) if squeeze else stack), labels


def accumulated_bias(
    stream: StreamWrites, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
) -> Float[Tensor, " d_model"]:
    """Sum of the output biases written before stream position ``layer`` (TransformerLens's).

    ``b_O`` of each layer before ``layer`` (and ``b_out`` with
    ``include_mlp_biases``); ``mlp_input`` adds ``layer``'s own ``b_O``. Reads
    only weights, so a model can answer it without a cache.
    """
    end = resolve_layer(layer, stream.n_layers)
    _no_mlp_at_unembed(mlp_input, end, stream.n_layers)
    total = torch.zeros_like(output_bias(stream, 0, "attn"))
    for block in range(end):
        total = total + output_bias(stream, block, "attn")
        if include_mlp_biases and stream.has_mlp:
            total = total + output_bias(stream, block, "mlp")
    if mlp_input:
        total = total + output_bias(stream, end, "attn")
    return total


def get_full_resid_decomposition(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    expand_neurons: bool = True,
    apply_ln: bool = False,
    pos_slice: SliceLike = None,
    project_output_onto: Tensor | None = None,
) -> Components:
    """Every head, every neuron (or MLP output), the embeddings and one ``bias``: the whole stream.

    Order and labels as TransformerLens: ``L{l}H{h}`` for each head before
    ``layer`` (and ``layer``'s own with ``mlp_input``), then ``L{l}N{n}`` (or
    ``{l}_mlp_out`` with ``expand_neurons=False``), ``embed``, ``pos_embed``,
    and ``bias``: every attention output bias plus, when neurons are
    expanded, every MLP output bias. Without ``apply_ln`` the components sum
    to the stream entering ``layer`` (its MLP with ``mlp_input``).
    """
    stream = cache.stream
    stream.require_additive()
    end = resolve_layer(layer, stream.n_layers)
    _no_mlp_at_unembed(mlp_input, end, stream.n_layers)
    pos = as_slice(pos_slice)
    project, squeeze = _projection(project_output_onto)
    heads, labels = stack_head_results(cache, end + int(mlp_input), pos_slice=pos)
    before: list[Tensor] = [heads]  # d_model components ahead of the neurons
    after: list[Tensor] = []  # and after them
    neurons: Tensor | None = None
    if stream.has_mlp and end > 0:
        if expand_neurons:
            neurons, neuron_labels = stack_neuron_results(
                cache, end, pos, apply_ln=apply_ln and project is not None,
                project_output_onto=project, mlp_input=mlp_input,
            )  # fmt: skip
        else:
            mlps, neuron_labels = decompose_resid(cache, end, mode="mlp", pos_slice=pos,
                                                  incl_embeds=False)  # fmt: skip
            before.append(mlps)
        labels += neuron_labels
    lead = heads.shape[1:-1]
    for label, hook in stream.embedding_hooks:
        after.append(pos.apply(cache[hook], dim=-2).expand(*lead, -1)[None])
        labels.append(label)
    bias = accumulated_bias(stream, end, mlp_input, include_mlp_biases=expand_neurons)
    after.append(bias.expand(1, *lead, -1))
    labels.append("bias")

    def finish(stack: Tensor) -> Tensor:
        if apply_ln:
            stack = apply_ln_to_stack(cache, stack, end, mlp_input, pos_slice=pos)
        return stack if project is None else stack @ project

    parts = [finish(torch.cat(before))]
    if neurons is not None:
        parts.append(neurons if project is not None else finish(neurons))
    parts.append(finish(torch.cat(after)))
    stack = torch.cat(parts)
    return (stack.squeeze(-1) if squeeze else stack), labels


def stack_activation(
    cache: ActivationCache,
    activation_name: str,
    layer: int | None = -1,
    sublayer_type: str | None = None,
) -> Float[Tensor, "layer ..."]:
    """The named activation of every block before ``layer``, stacked: ``[layer, ...]``."""
    end = resolve_layer(layer, cache.stream.n_layers)
    first = cache[(activation_name, 0, sublayer_type)]
    if end == 0:
        return first.new_zeros((0, *first.shape))
    return torch.stack([cache[(activation_name, block, sublayer_type)] for block in range(end)])
