"""ActivationCache: the activations of one forward, keyed by validated hook name."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mitk.cache import decompose
from mitk.cache.heads import expand_kv_heads
from mitk.cache.residual_stack import ResidualStack
from mitk.cache.writes import StreamWrites
from mitk.errors import MitkError, ShapeMismatchError, UnknownHookError
from mitk.hooks import name


class NotCachedError(MitkError, KeyError):
    """A valid hook name whose activation was not stored in this cache."""

    def __str__(self) -> str:
        return str(self.args[0])


@runtime_checkable
class CachedModel(Protocol):
    """What the cache needs from a model: its hook names, and its stream's writes and weights."""

    @property
    def hook_dict(self) -> Mapping[str, object]: ...

    def stream_writes(self) -> StreamWrites: ...


CacheKey = str | tuple[Any, ...]


class ActivationCache(Mapping[str, Tensor]):
    """A read-only mapping from hook name to activation.

    Keys may be full names (``"blocks.0.attn.hook_pattern"``) or the typed
    short form ``cache["pattern", 0]`` / ``cache["scale", 1, "ln2"]``. A name
    the model does not have raises ``UnknownHookError`` with suggestions; a
    real name that was not cached raises ``NotCachedError`` saying how to
    cache it.
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
    def stream(self) -> StreamWrites:
        """The model's residual-stream writes (facts and live output weights) for decompositions."""
        return self.model.stream_writes()

    def _resolve(self, key: CacheKey) -> str:
        if isinstance(key, tuple):
            kind, *rest = key
            key = name(kind, *rest)
        if not isinstance(key, str):
            raise TypeError(f"cache keys are hook names or (kind, layer) tuples, got {key!r}")
        if key not in self.model.hook_dict:
            raise UnknownHookError(key, self.model.hook_dict)
        return key

    def __getitem__(self, key: CacheKey) -> Tensor:
        full = self._resolve(key)
        if full not in self._acts:
            raise NotCachedError(
                f"hook {full!r} exists but was not cached in this run; include it in "
                "run_with_cache(names_filter=...) (or leave names_filter=None to cache everything)"
            )
        return self._acts[full]

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

    # --- residual-stream decompositions (see mitk.cache.decompose) ----------------------
    def decompose_resid(self, layer: int | None = None) -> ResidualStack:
        """Embeddings and each sublayer's output before ``layer``; sums to the stream there."""
        return decompose.decompose_resid(self, layer)

    def stack_head_results(self, layer: int | None = None) -> ResidualStack:
        """One write per head plus each layer's output bias; per layer they sum to attn_out."""
        return decompose.stack_head_results(self, layer)

    def stack_neuron_results(
        self, layer: int | None = None, neurons: list[int] | Tensor | None = None
    ) -> ResidualStack:
        """Per-neuron writes of every MLP before ``layer`` (exclusive), plus each output bias."""
        return decompose.stack_neuron_results(self, layer, neurons)

    def accumulated_resid(self, layer: int | None = None) -> ResidualStack:
        """The stream entering each block up to ``layer`` (None adds the final stream)."""
        return decompose.accumulated_resid(self, layer)

    def apply_ln_to_stack(self, stack: ResidualStack, layer: int | None = None) -> ResidualStack:
        """Centre and divide each component by the norm's cached scale at ``layer``."""
        return decompose.apply_ln_to_stack(self, stack, layer)

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
