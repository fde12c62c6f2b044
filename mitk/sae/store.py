"""ActivationStore: a model's activations at chosen hooks, in seeded shuffled chunks.

Runs the model over a token source, one chunk at a time (optionally cached on disk as
safetensors shards that ``CachedActivations`` can replay without the model).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from mitk.errors import ConfigError
from mitk.hooks import layer_of, resolve_names
from mitk.model import HookedTransformer
from mitk.model.inputs import check_length
from mitk.sae.chunks import ChunkedSource, open_manifest
from mitk.sae.sources import jsonable, seeded_permutation
from mitk.sae.tokens import TokenSource, as_token_source, content_digest, save_atomic
from mitk.shapes import Int

_NO_POS_AXIS = ("attn.hook_attn_scores", "attn.hook_pattern")  # [batch, head, pos, key_pos]


class ActivationStore(ChunkedSource):
    """Activations of ``model`` at ``hook_names``, served in seeded, shuffled chunks.

    - ``tokens``: a ``TokenSource``, a ``[n, ctx]`` tensor, a text file (tokenised
      with ``model.tokenizer``) or a directory of token shards. ``context_size``
      (default: the source's) may shorten sequences, never lengthen them.
    - Chunk ``c`` takes the next ``sequences_per_chunk`` sequences (enough for
      ``buffer_batches * batch_size`` rows even if every BOS is dropped) of an
      endless walk through the source (each epoch a permutation seeded by
      ``(seed, epoch)``), runs the model on them ``model_batch_size`` at a time in
      one pass for all hooks, stopping after the last block a hook needs, flattens
      batch × position, shuffles with a generator seeded by ``(seed, c)`` and keeps
      exactly ``buffer_batches * batch_size`` rows.
    - ``exclude_bos``: a row's position 0 is dropped when its token is the BOS id of
      ``model.tokenizer`` (nothing is dropped when the model has no tokenizer).
    - Activations with extra axes are flattened: ``attn.hook_z`` ``[batch, pos,
      head, d_head]`` gives ``d_in = head * d_head``. Hooks without a position axis
      (attention scores and patterns) are refused.
    - ``normalize`` (default on; the sparsity defaults assume it): batches are scaled
      so chunk 0's mean row norm is ``sqrt(d_in)``; the trainer folds the factor
      back, so trained SAEs read raw activations.
    - ``device``/``dtype``: where batches (and the chunk in memory) live; the
      default device is the model's.
    - ``cache_dir``: chunks are read from / written to ``chunk_{c:06d}.safetensors``
      (unscaled, in ``dtype``) beside a ``manifest.json`` holding ``fingerprint()``;
      a directory written for other settings raises ``CacheMismatchError``.

    Unknown hook names raise ``UnknownHookError``; bad token ids raise the model's
    ``InvalidTokensError`` when their chunk is computed. The model's weights must
    not change while the store is used (they are fingerprinted at construction).
    """

    def __init__(
        self,
        model: HookedTransformer,
        hook_names: str | Sequence[str],
        tokens: TokenSource | Tensor | str | Path,
        *,
        batch_size: int = 4096,
        context_size: int | None = None,
        model_batch_size: int = 32,
        buffer_batches: int = 32,
        exclude_bos: bool = True,
        normalize: bool = True,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        names = resolve_names(
            [hook_names] if isinstance(hook_names, str) else hook_names, model.hook_dict
        )
        for name in names:
            if name.endswith(_NO_POS_AXIS):
                raise ConfigError(f"{name!r} has no per-position layout; pick another hook")
        sizes = {"batch_size": batch_size, "model_batch_size": model_batch_size,
                 "buffer_batches": buffer_batches}  # fmt: skip
        if min(sizes.values()) < 1:
            raise ConfigError(f"sizes must be >= 1, got {sizes}")
        self.model = model
        self.hook_names = tuple(names)
        self.tokens = as_token_source(tokens, model, context_size)
        self.context_size = context_size or self.tokens.context_size
        if self.context_size > self.tokens.context_size:
            raise ConfigError(
                f"context_size={self.context_size} is longer than the token "
                f"source's sequences ({self.tokens.context_size})"
            )
        check_length(self.context_size, model.cfg)
        tokenizer = model.tokenizer
        self.bos_token_id = (
            tokenizer.bos_token_id if exclude_bos and tokenizer is not None else None
        )
        min_rows = self.context_size - (self.bos_token_id is not None)
        if min_rows < 1:
            raise ConfigError("context_size=1 with exclude_bos leaves no positions")
        self.batch_size, self.buffer_batches = batch_size, buffer_batches
        self.model_batch_size, self.seed = model_batch_size, seed
        self.exclude_bos, self.normalize, self.dtype = exclude_bos, normalize, dtype
        self.sequences_per_chunk = math.ceil(self.rows_per_chunk / min_rows)
        self.stop_at_layer = self._stop_layer()
        self.device = torch.device(device) if device else next(model.parameters()).device
        probe = self._activations(torch.zeros((1, 1), dtype=torch.long))
        self.d_in = {name: int(act.shape[-1]) for name, act in probe.items()}
        self._fingerprint = jsonable(self._describe())
        self._epoch_order: tuple[int, Tensor] | None = None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            open_manifest(self.cache_dir, self._fingerprint)

    def _stop_layer(self) -> int | None:
        # Stop after the last block a hook lives in, unless some hook (ln_final) needs the end.
        stop = max(
            (layer + 1 for n in self.hook_names if (layer := layer_of(n)) is not None), default=0
        )
        fired = set(self.model.hooks_that_fire(None, stop))
        return stop if all(name in fired for name in self.hook_names) else None

    def _activations(self, tokens: Int[Tensor, "b pos"]) -> dict[str, Tensor]:
        """One forward: ``[b, pos, d_in]`` per hook, extra axes flattened."""
        kwargs: dict[str, Any] = (
            {"return_type": "hidden"}
            if self.stop_at_layer is None
            else {"stop_at_layer": self.stop_at_layer}
        )
        with torch.no_grad():
            _, cache = self.model.run_with_cache(
                tokens, names_filter=list(self.hook_names), **kwargs
            )
        return {name: cache[name].reshape(*tokens.shape, -1) for name in self.hook_names}

    def sequence_indices(self, chunk: int) -> Int[Tensor, " n"]:
        """The token-source indices chunk ``chunk`` runs, in order."""
        n = self.tokens.n_sequences
        walk = torch.arange(
            chunk * self.sequences_per_chunk, (chunk + 1) * self.sequences_per_chunk
        )
        epochs, within = walk // n, walk % n
        out = torch.empty_like(walk)
        for epoch in epochs.unique().tolist():
            if self._epoch_order is None or self._epoch_order[0] != epoch:
                self._epoch_order = (epoch, seeded_permutation(n, self.seed, "tokens", epoch))
            here = epochs == epoch
            out[here] = self._epoch_order[1][within[here]]
        return out

    def _make_chunk(self, index: int) -> dict[str, Tensor]:
        if self.cache_dir is not None and self.chunk_path(index).exists():
            return self._read_chunk(self.chunk_path(index))
        tokens = self.tokens.sequences(self.sequence_indices(index))[:, : self.context_size]
        pieces: dict[str, list[Tensor]] = {name: [] for name in self.hook_names}
        for start in range(0, tokens.shape[0], self.model_batch_size):
            part = tokens[start : start + self.model_batch_size]
            keep = torch.ones(part.shape, dtype=torch.bool)
            if self.bos_token_id is not None:
                keep[:, 0] = part[:, 0] != self.bos_token_id
            for name, act in self._activations(part).items():
                pieces[name].append(act[keep.to(act.device)].to(self.device, self.dtype))
        rows = {name: torch.cat(parts) for name, parts in pieces.items()}
        n_rows = next(iter(rows.values())).shape[0]
        order = seeded_permutation(n_rows, self.seed, "chunk", index)[: self.rows_per_chunk]
        rows = {name: r[order.to(r.device)].contiguous() for name, r in rows.items()}
        if self.cache_dir is not None:
            save_atomic(rows, self.chunk_path(index))
        return rows

    def fill_cache(self, n_chunks: int, progress: bool = True) -> list[Path]:
        """Compute chunks ``0 .. n_chunks-1`` into ``cache_dir`` (skipping existing ones); paths."""
        if self.cache_dir is None:
            raise ConfigError("fill_cache needs an ActivationStore built with cache_dir=")
        paths = []
        for index in tqdm(range(n_chunks), desc="activation chunks", disable=not progress):
            path = self.chunk_path(index)
            if not path.exists():
                self._make_chunk(index)
            paths.append(path)
        return paths

    def _describe(self) -> dict[str, Any]:
        config = self.model.cfg.to_dict(placement=False)
        config.pop("extra", None)  # provenance only; never changes an activation
        return {
            "kind": "activation_store",
            "model": {"config": config, "weights": content_digest(self.model.state_dict())},
            "hook_names": list(self.hook_names),
            "d_in": self.d_in,
            "tokens": self.tokens.fingerprint(),
            "context_size": self.context_size,
            "batch_size": self.batch_size,
            "buffer_batches": self.buffer_batches,
            "model_batch_size": self.model_batch_size,  # forward batching can change the last bit
            "exclude_bos": self.exclude_bos,
            "bos_token_id": self.bos_token_id,
            "normalize": self.normalize,
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def fingerprint(self) -> dict[str, Any]:
        """Model config and weight digest, hooks, tokens and every setting that shapes the data."""
        return jsonable(self._fingerprint)
