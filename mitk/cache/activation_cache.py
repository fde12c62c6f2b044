"""ActivationCache: the activations of one forward, keyed by validated hook name.

The decomposition methods take TransformerLens's arguments with its meanings
and return what it returns: a plain tensor ``[component, *lead, d_model]``,
``(tensor, labels)`` with ``return_labels=True``, or (mitk) a ``ResidualStack``
with ``as_stack=True``. The arithmetic lives in ``decompose``, ``norm`` and
``logit_attrs``; argument checking in ``selection``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mitk.cache import decompose
from mitk.cache.decompose import Components
from mitk.cache.errors import NotCachedError
from mitk.cache.heads import expand_kv_heads
from mitk.cache.logit_attrs import TokenLike
from mitk.cache.logit_attrs import logit_attrs as _logit_attrs
from mitk.cache.norm import apply_ln_to_stack as _apply_ln_to_stack
from mitk.cache.residual_stack import ResidualStack
from mitk.cache.selection import SliceLike, as_slice, block_index
from mitk.cache.writes import StreamWrites, expert_writes, head_writes
from mitk.errors import ShapeMismatchError, UnknownHookError
from mitk.hooks import layer_of, name
from mitk.shapes import Float
from mitk.utils import get_act_name

__all__ = ["ActivationCache", "CachedModel", "NotCachedError"]


@runtime_checkable
class CachedModel(Protocol):
    """What the cache needs from a model: its hook names, and its stream's writes and weights."""

    @property
    def hook_dict(self) -> Mapping[str, object]: ...

    def stream_writes(self) -> StreamWrites: ...


CacheKey = str | tuple[Any, ...]
Stacked = Tensor | tuple[Tensor, list[str]] | ResidualStack
"""A stack as asked for: the tensor, ``(tensor, labels)``, or a ``ResidualStack``."""


def _stacked(components: Components, return_labels: bool, as_stack: bool) -> Stacked:
    tensor, labels = components
    if as_stack:
        return ResidualStack(tensor, labels)
    return (tensor, labels) if return_labels else tensor


class ActivationCache(Mapping[str, Tensor]):
    """A mapping from hook name to activation, with TransformerLens's cache methods.

    Keys may be full names (``"blocks.0.attn.hook_pattern"``), TransformerLens
    short names (``"embed"``, ``"scale4ln1"``) or tuples ``(name, layer,
    layer_type)`` (``cache["pattern", 0]``, ``cache["scale", 1, "ln2"]``,
    ``cache["resid_post", -1]``: negative layers count from the last block).
    A name the model does not have raises ``UnknownHookError`` with
    suggestions; a real name that was not cached raises ``NotCachedError``
    saying how to cache it. Per-head results (``cache["result", L]``) are
    derived from ``hook_z`` when they were not cached. ``cache_dict`` is the
    dict behind the mapping, as in TransformerLens.
    """

    def __init__(
        self,
        activations: dict[str, Tensor],
        model: CachedModel,
        has_batch_dim: bool = True,
        gradients: dict[str, Tensor] | None = None,
    ) -> None:
        self._acts = activations
        self._grads = gradients or {}
        self.model = model
        self.has_batch_dim = has_batch_dim

    @property
    def cache_dict(self) -> dict[str, Tensor]:
        """The dict of stored activations itself (TransformerLens's; edits show through)."""
        return self._acts

    @property
    def stream(self) -> StreamWrites:
        """The model's residual-stream writes (facts and live output weights) for decompositions."""
        return self.model.stream_writes()

    # --- lookup ----------------------------------------------------------------------------
    def _resolve(self, key: CacheKey) -> str:
        hooks = self.model.hook_dict
        if isinstance(key, str):
            full = key if key in self._acts or key in hooks else get_act_name(key)
        elif isinstance(key, tuple) and key and isinstance(key[0], str):
            kind, *rest = key
            if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool) and rest[0] < 0:
                n_layers = self.stream.n_layers
                if rest[0] < -n_layers:
                    raise UnknownHookError(f"{kind} at layer {rest[0]}", hooks, what="activation")
                rest[0] = block_index(rest[0], n_layers)
            full = get_act_name(kind, *rest)
        else:
            raise UnknownHookError(repr(key), hooks, what="cache key (a name or (name, layer))")
        if full not in hooks:
            raise UnknownHookError(full, hooks)
        return full

    def __getitem__(self, key: CacheKey) -> Tensor:
        full = self._resolve(key)
        if full in self._acts:
            return self._acts[full]
        layer = layer_of(full)
        if layer is not None and full == name("result", layer) and name("z", layer) in self._acts:
            return self.head_results(layer)
        if layer is not None and full == name("expert_out", layer):
            return self.expert_results(layer)
        how = " (or hook_z, which it is derived from)" if full.endswith("hook_result") else ""
        raise NotCachedError(
            f"hook {full!r} exists but was not cached in this run; include it{how} in "
            "run_with_cache(names_filter=...) (or leave names_filter=None to cache everything)"
        )

    def head_results(self, layer: int) -> Float[Tensor, "*lead head d_model"]:
        """Each head's write at block ``layer`` without ``b_O``: ``hook_result`` if cached, else
        derived from ``hook_z`` and ``W_O`` (not stored)."""
        self.stream.require_heads(layer)
        result = name("result", layer)
        if result in self._acts:
            return self._acts[result]
        z = self._acts.get(name("z", layer))
        if z is None:
            raise NotCachedError(
                f"per-head results of layer {layer} need {name('z', layer)!r} (or {result!r}) "
                "cached; include it in run_with_cache(names_filter=...)"
            )
        return head_writes(self.stream, layer, z).movedim(0, -2)

    def expert_results(self, layer: int) -> Float[Tensor, "*lead expert d_model"]:
        """Each routed expert's weighted write at MoE ``layer``: ``hook_expert_out`` if cached,
        else recomputed from the stream the MLP read and the cached routing (not stored)."""
        stored = self._acts.get(name("expert_out", layer))
        if stored is not None:
            return stored
        kinds = (self.stream.mlp_reads, "expert_indices", "expert_weights")
        needed = [name(kind, layer) for kind in kinds]
        missing = [n for n in needed if n not in self._acts]
        if missing:
            raise NotCachedError(
                f"per-expert writes of layer {layer} need {missing} cached (or "
                f"{name('expert_out', layer)!r}); include them in run_with_cache(names_filter=...)"
            )
        return expert_writes(self.stream, layer, *(self._acts[n] for n in needed))

    def compute_head_results(self) -> None:
        """Store ``blocks.{L}.attn.hook_result`` for every layer that lacks it (TransformerLens's).

        Derived from ``hook_z`` and ``W_O``; results already stored are kept as
        they are. Reading ``cache["result", L]`` works without this call.
        """
        for layer in range(self.stream.n_layers):
            result = name("result", layer)
            if result not in self._acts:
                self._acts[result] = self.head_results(layer)

    def per_query_head(self, key: CacheKey) -> Tensor:
        """A cached key or value with one slice per query head: ``[batch, pos, head, d_head]``.

        For ``k``, ``rot_k`` and ``v`` hooks, which keep the key-value head
        count under grouped-query attention; query head ``h`` gets key-value
        head ``h // kv_group_size``, as attention reads it. A copy when grouped,
        the cached tensor itself otherwise.
        """
        full = self._resolve(key)
        if not full.endswith(("hook_k", "hook_rot_k", "hook_v")):
            raise ValueError(f"per_query_head expands k, rot_k or v activations, not {full!r}")
        return expand_kv_heads(self[full], self.stream.n_heads)

    def grad(self, key: CacheKey) -> Tensor:
        """Gradient of the output w.r.t. a cached activation (``run_with_cache(incl_bwd=True)``)."""
        full = self._resolve(key)
        if full not in self._grads:
            raise NotCachedError(
                f"no gradient cached for {full!r}; run_with_cache(..., incl_bwd=True) stores them"
            )
        return self._grads[full]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._acts

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def get_act(self, kind: str, layer: int | None = None, norm: str | None = None) -> Tensor:
        """Typed lookup: ``cache.get_act("resid_pre", 3)``."""
        return self[name(kind, layer, norm)]

    # --- the batch -------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> ActivationCache:
        """A copy with every tensor on ``device``."""
        move = {k: v.to(device) for k, v in self._acts.items()}
        grads = {k: v.to(device) for k, v in self._grads.items()}
        return ActivationCache(move, self.model, self.has_batch_dim, grads)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of every activation, in place, and return this cache.

        As TransformerLens does: the batch must have size 1 (else
        ``ShapeMismatchError``, and nothing changes); a cache without a batch
        axis is returned as it is.
        """
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in [*self._acts.values(), *self._grads.values()]}
        if sizes - {1}:
            raise ShapeMismatchError(
                f"remove_batch_dim needs batch size 1, the cache holds {sorted(sizes)}"
            )
        for store in (self._acts, self._grads):
            for key, value in store.items():
                store[key] = value[0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: SliceLike) -> ActivationCache:
        """A new cache holding the selected batch rows (an int drops the batch axis).

        Gradients are sliced alike. A cache without a batch axis raises
        ``ShapeMismatchError`` (an ``AssertionError``, as TransformerLens's).
        """
        batch = as_slice(batch_slice, "batch_slice")
        if not self.has_batch_dim:
            raise ShapeMismatchError("cannot index into a cache without a batch dim")
        acts = {k: batch.apply(v, dim=0) for k, v in self._acts.items()}
        grads = {k: batch.apply(v, dim=0) for k, v in self._grads.items()}
        return ActivationCache(acts, self.model, batch.mode != "int", grads)

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)``: global torch state, as TransformerLens's does.

        Prefer ``with torch.no_grad():``, which restores the state on exit.
        """
        torch.set_grad_enabled(mode)

    # --- residual-stream decompositions (mitk.cache.decompose) -------------------------------
    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        mlp_input: bool = False,
        return_labels: bool = False,
        *,
        as_stack: bool = False,
    ) -> Stacked:
        """The stream entering each layer up to ``layer`` (None or -1: also the final stream).

        Labels ``{l}_pre``, ``{l}_mid`` (``incl_mid``; ``mlp_input`` adds
        ``layer``'s), ``final_post``. ``apply_ln`` at the unembed applies
        ``ln_final`` to each snapshot (a logit lens), elsewhere the cached scale.
        """
        parts = decompose.accumulated_resid(self, layer, incl_mid, apply_ln, pos_slice, mlp_input)
        return _stacked(parts, return_labels, as_stack)

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        *,
        as_stack: bool = False,
    ) -> Stacked:
        """Embeddings and each sublayer output before ``layer``; they sum to the stream there.

        Labels ``embed``, ``pos_embed``, ``{l}_attn_out``, ``{l}_mlp_out``
        (``{l}_mixer_out`` for a state-space layer); ``mode`` is ``"all"``, ``"attn"``
        or ``"mlp"``.
        """
        parts = decompose.decompose_resid(
            self, layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds
        )
        return _stacked(parts, return_labels, as_stack)

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceLike = None,
        apply_ln: bool = False,
        *,
        incl_bias: bool = False,
        as_stack: bool = False,
    ) -> Stacked:
        """One write per head (``L{l}H{h}``) of every layer before ``layer``, from ``hook_z``.

        ``incl_remainder`` adds ``remainder`` (the stream entering ``layer``
        minus the heads); ``incl_bias`` (mitk) adds ``L{l}_attn_bias`` after
        each layer's heads, so each layer's part sums to its ``hook_attn_out``.
        """
        parts = decompose.stack_head_results(
            self, layer, incl_remainder, pos_slice, apply_ln, incl_bias
        )
        return _stacked(parts, return_labels, as_stack)

    def stack_neuron_results(
        self,
        layer: int | None = -1,
        pos_slice: SliceLike = None,
        neuron_slice: SliceLike = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Tensor | None = None,
        *,
        incl_bias: bool = False,
        as_stack: bool = False,
    ) -> Stacked:
        """Per-neuron writes (``L{l}N{n}``) of every MLP before ``layer`` (exclusive).

        ``neuron_slice`` picks neurons in every layer; ``incl_remainder``,
        ``incl_bias`` as for heads (``L{l}_mlp_bias``); ``project_output_onto``
        (``[d_model]`` or ``[d_model, n]``) projects each write cheaply.
        """
        parts = decompose.stack_neuron_results(
            self, layer, pos_slice, neuron_slice, incl_remainder, apply_ln,
            project_output_onto, incl_bias,
        )  # fmt: skip
        return _stacked(parts, return_labels, as_stack)

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
        *,
        as_stack: bool = False,
    ) -> Stacked:
        """Every head, every neuron (or MLP output), ``embed``, ``pos_embed`` and one ``bias``.

        Without ``apply_ln`` the components sum to the stream entering
        ``layer`` (its MLP with ``mlp_input``).
        """
        parts = decompose.get_full_resid_decomposition(
            self, layer, mlp_input, expand_neurons, apply_ln, pos_slice, project_output_onto
        )
        return _stacked(parts, return_labels, as_stack)

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: SliceLike = None,
        pos_slice: SliceLike = None,
        project_output_onto: Tensor | None = None,
    ) -> Tensor:
        """Each selected neuron's write at block ``layer``: ``[*lead, neuron, d_model]``."""
        return decompose.get_neuron_results(
            self, layer, neuron_slice, pos_slice, project_output_onto
        )

    def stack_activation(
        self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None
    ) -> Tensor:
        """``activation_name`` of every block before ``layer``, stacked on a new first dim."""
        return decompose.stack_activation(self, activation_name, layer, sublayer_type)

    def apply_ln_to_stack(
        self,
        residual_stack: Tensor | ResidualStack,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceLike = None,
        batch_slice: SliceLike = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Tensor | ResidualStack:
        """Each component as the norm reading ``layer`` saw it, with the cached scale.

        Centred (LayerNorm) and divided by the scale; weight and bias not
        applied, so a full decomposition sums to that norm's
        ``hook_normalized``. ``pos_slice``/``batch_slice`` are those the stack
        was built with. A ``ResidualStack`` comes back as one.
        """
        stack = (
            residual_stack.tensor if isinstance(residual_stack, ResidualStack) else residual_stack
        )
        out = _apply_ln_to_stack(
            self, stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
        )
        if isinstance(residual_stack, ResidualStack):
            return ResidualStack(out, residual_stack.labels)
        return out

    def logit_attrs(
        self,
        residual_stack: Tensor,
        tokens: TokenLike,
        incorrect_tokens: TokenLike | None = None,
        pos_slice: SliceLike = None,
        batch_slice: SliceLike = None,
        has_batch_dim: bool = True,
    ) -> Tensor:
        """Each component's direct effect on the logit of ``tokens`` (less ``incorrect_tokens``)."""
        return _logit_attrs(
            self, residual_stack, tokens, incorrect_tokens, pos_slice, batch_slice, has_batch_dim
        )

    def summary(self) -> str:
        """One line per cached activation: name, shape, dtype and RMS (for a quick look)."""
        width = max((len(k) for k in self._acts), default=0)
        lines = [f"{'hook':<{width}}  {'shape':<22} {'dtype':<14} rms"]
        for key, value in self._acts.items():
            rms = value.float().pow(2).mean().sqrt().item() if value.numel() else float("nan")
            shape = str(tuple(value.shape))
            lines.append(f"{key:<{width}}  {shape:<22} {value.dtype!s:<14} {rms:.4g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, has_batch_dim={self.has_batch_dim})"
