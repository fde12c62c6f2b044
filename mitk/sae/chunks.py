"""Chunked activation sources: fixed, shuffled chunks of rows, optionally cached as shards.

``ActivationStore`` computes chunks by running a model; ``CachedActivations`` replays the
safetensors shards a store wrote, without the model, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
import torch
from torch import Tensor

from mitk.atomic import atomic_write_text
from mitk.errors import ConfigError, MitkError
from mitk.sae.sources import jsonable, norm_scale
from mitk.shapes import Float

MANIFEST = "manifest.json"
CACHE_FORMAT = "mitk.sae.activation_cache/1"


class CacheMismatchError(ConfigError):
    """A cache directory was written for different settings, model or tokens."""


class ChunkNotCachedError(MitkError, LookupError):
    """A step needs an activation chunk that the cache directory does not hold."""


class ChunkedSource:
    """Batches cut from fixed chunks of ``buffer_batches * batch_size`` shuffled rows."""

    hook_names: tuple[str, ...]
    batch_size: int
    buffer_batches: int
    d_in: dict[str, int]
    normalize: bool
    device: torch.device
    dtype: torch.dtype
    cache_dir: Path | None
    _last: tuple[int, dict[str, Tensor]] | None = None
    _scales: dict[str, float] | None = None

    @property
    def rows_per_chunk(self) -> int:
        return self.batch_size * self.buffer_batches

    def chunk_path(self, index: int) -> Path:
        """Where chunk ``index`` lives in the cache directory."""
        if self.cache_dir is None:
            raise ConfigError("this activation source has no cache_dir")
        return self.cache_dir / f"chunk_{index:06d}.safetensors"

    def _make_chunk(self, index: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def chunk(self, index: int) -> dict[str, Float[Tensor, "rows _d_in"]]:
        """Unscaled rows ``[buffer_batches * batch_size, d_in]`` per hook of chunk ``index``.

        The most recent chunk stays in memory, so consecutive steps reuse it.
        """
        if index < 0:
            raise ConfigError(f"chunk index must be >= 0, got {index}")
        if self._last is None or self._last[0] != index:
            rows = self._make_chunk(index)
            self._last = (index, {n: r.to(self.device, self.dtype) for n, r in rows.items()})
        return self._last[1]

    def _read_chunk(self, path: Path) -> dict[str, Tensor]:
        rows = load_file(path)
        for name in self.hook_names:
            want = (self.rows_per_chunk, self.d_in[name])
            if name not in rows or tuple(rows[name].shape) != want:
                got = tuple(rows[name].shape) if name in rows else "nothing"
                raise CacheMismatchError(f"{path} holds {got} for {name!r}, expected {want}")
        return rows

    def batch(self, step: int) -> dict[str, Float[Tensor, "batch _d_in"]]:
        """Rows ``[batch_size, d_in]`` per hook for ``step``, on ``device`` in ``dtype``.

        Batch ``step`` is slice ``step % buffer_batches`` of chunk
        ``step // buffer_batches``, multiplied by ``scale(hook)``.
        """
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        scales = {n: self.scale(n) for n in self.hook_names}  # may read chunk 0: do it first
        index, within = divmod(step, self.buffer_batches)
        rows = self.chunk(index)
        part = slice(within * self.batch_size, (within + 1) * self.batch_size)
        return {n: rows[n][part] * scales[n] if self.normalize else rows[n][part].clone()
                for n in self.hook_names}  # fmt: skip

    def scale(self, hook_name: str) -> float:
        """The factor batches of ``hook_name`` were multiplied by (1.0 unless normalising).

        When normalising it is ``sqrt(d_in) / mean row norm`` of chunk 0.
        """
        if hook_name not in self.d_in:
            raise ConfigError(f"{hook_name!r} is not one of this source's hooks {self.hook_names}")
        if not self.normalize:
            return 1.0
        if self._scales is None:
            self._scales = {n: norm_scale(rows) for n, rows in self.chunk(0).items()}
        return self._scales[hook_name]


def open_manifest(directory: Path, fingerprint: dict[str, Any]) -> None:
    """Check ``directory``'s manifest against ``fingerprint``, or write it when absent."""
    path = directory / MANIFEST
    if path.exists():
        stored = json.loads(path.read_text()).get("fingerprint", {})
        if stored != fingerprint:
            differ = sorted(
                k for k in {*stored, *fingerprint} if stored.get(k) != fingerprint.get(k)
            )
            raise CacheMismatchError(
                f"activation cache {str(directory)!r} was written for different settings "
                f"(they differ in {differ}); use another cache_dir or delete this one"
            )
        return
    atomic_write_text(
        path, json.dumps({"format": CACHE_FORMAT, "fingerprint": fingerprint}, indent=1)
    )


class CachedActivations(ChunkedSource):
    """Replay an ``ActivationStore`` cache directory without the model.

    Gives bit-identical batches to the store that wrote it, for the steps whose
    chunks exist; a later step raises ``ChunkNotCachedError``. ``fingerprint()`` is
    the writing store's, so a trainer may switch between the two when resuming.
    With normalisation, chunk 0 must be present (the scale comes from it).
    """

    def __init__(self, cache_dir: str | Path, *, device: str | torch.device = "cpu") -> None:
        self.cache_dir = Path(cache_dir)
        manifest = self.cache_dir / MANIFEST
        if not manifest.is_file():
            raise ChunkNotCachedError(
                f"{str(cache_dir)!r} has no {MANIFEST}; not an activation cache"
            )
        data = json.loads(manifest.read_text())
        if data.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(f"{manifest} has format {data.get('format')!r}")
        self._fingerprint = data["fingerprint"]
        fp = self._fingerprint
        self.hook_names = tuple(fp["hook_names"])
        self.batch_size, self.buffer_batches = int(fp["batch_size"]), int(fp["buffer_batches"])
        self.d_in = {name: int(width) for name, width in fp["d_in"].items()}
        self.normalize = bool(fp["normalize"])
        self.dtype = getattr(torch, fp["dtype"])
        self.device = torch.device(device)

    def cached_chunks(self) -> list[int]:
        """Indices of the chunk files present, sorted."""
        files = self.chunk_path(0).parent.glob("chunk_*.safetensors")
        return sorted(int(p.stem.removeprefix("chunk_")) for p in files)

    def _make_chunk(self, index: int) -> dict[str, Tensor]:
        path = self.chunk_path(index)
        if not path.exists():
            have = self.cached_chunks()
            span = f"chunks {have[0]}..{have[-1]} ({len(have)} files)" if have else "no chunks"
            raise ChunkNotCachedError(
                f"chunk {index} (steps {index * self.buffer_batches}.."
                f"{(index + 1) * self.buffer_batches - 1}) is not in {str(self.cache_dir)!r}, "
                f"which holds {span}; fill it with ActivationStore.fill_cache"
            )
        return self._read_chunk(path)

    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the store that wrote the cache."""
        return jsonable(self._fingerprint)
