"""Token sources: where the sequences an activation store runs through the model come from.

A token source is a fixed, indexable set of equal-length sequences. The store asks
for rows by index (``sequences(indices)``) so it can walk them in a seeded order and
resume anywhere. Three sources: an in-memory tensor, a text file tokenised once with
the model's tokenizer, and a directory of safetensors token shards.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from safetensors import safe_open
from safetensors.torch import save_file
import torch
from torch import Tensor

from mitk.atomic import atomic_write
from mitk.errors import ConfigError, InvalidTokensError, MitkError
from mitk.model import HookedTransformer, NoTokenizerError
from mitk.shapes import Int

SHARD_KEY = "tokens"
_TEXT_BLOCK_CHARS = 1 << 20  # tokenise big files in ~1 MB blocks of whole lines
_DIGEST_SAMPLES = 4096


class TokenFileNotFoundError(MitkError, FileNotFoundError):
    """A text file or shard directory given as a token source does not exist."""


@runtime_checkable
class TokenSource(Protocol):
    """A fixed set of ``n_sequences`` token sequences, each ``context_size`` long."""

    @property
    def n_sequences(self) -> int: ...

    @property
    def context_size(self) -> int: ...

    def sequences(self, indices: Int[Tensor, " n"]) -> Int[Tensor, "n ctx"]: ...

    def fingerprint(self) -> dict[str, Any]: ...


def content_digest(tensors: Mapping[str, Tensor]) -> str:
    """A cheap, device-independent digest of named tensors: names, shapes, dtypes, sampled values.

    Hashes up to 4096 evenly spaced elements per tensor, so it tells different data
    apart (other weights, other tokens) without reading everything; a single edited
    element can slip through.
    """
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        flat = tensor.reshape(-1)
        stride = max(1, flat.numel() // _DIGEST_SAMPLES)
        sample = flat[::stride].cpu().contiguous()
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()


def _checked_token_matrix(tokens: object, what: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.is_complex():
        kind = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
        raise InvalidTokensError(f"{what} must be an integer tensor of token ids, got {kind}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise InvalidTokensError(
            f"{what} must be a non-empty [n_sequences, context] tensor, got {tuple(tokens.shape)}"
        )
    return tokens


class TensorTokens:
    """Token sequences held in memory: a ``[n_sequences, context]`` integer tensor.

    Raises ``InvalidTokensError`` for a float tensor, another rank or no rows.
    """

    def __init__(self, tokens: Tensor) -> None:
        self.tokens = _checked_token_matrix(tokens, "tokens").cpu()

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def context_size(self) -> int:
        return int(self.tokens.shape[1])

    def sequences(self, indices: Int[Tensor, " n"]) -> Int[Tensor, "n ctx"]:
        """The rows at ``indices`` as int64."""
        return self.tokens[indices.cpu()].long()

    def fingerprint(self) -> dict[str, Any]:
        """Kind, shape and a sampled digest of the token ids."""
        return {
            "kind": "tensor",
            "shape": list(self.tokens.shape),
            "digest": content_digest({"tokens": self.tokens.long()}),
        }


class TextFileTokens(TensorTokens):
    """A UTF-8 text file tokenised once, concatenated and cut into rows of ``context_size``.

    With ``prepend_bos`` and a tokenizer that has a BOS token, every row is the BOS
    id followed by ``context_size - 1`` text tokens; otherwise ``context_size`` text
    tokens. The last partial row is dropped. The file is read in blocks of whole
    lines, so a huge file never sits in memory as one string. Raises
    ``TokenFileNotFoundError`` for a missing file and ``ConfigError`` when the file
    is empty or too short to fill one row.
    """

    def __init__(
        self, path: str | Path, tokenizer: Any, context_size: int, prepend_bos: bool = True
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise TokenFileNotFoundError(f"token text file {str(path)!r} does not exist")
        if tokenizer is None:
            raise NoTokenizerError(f"reading text from {str(path)!r} needs a tokenizer")
        if context_size < 1 + int(prepend_bos):
            raise ConfigError(f"context_size={context_size} is too small for rows of text")
        ids, file_digest = _tokenize_file(path, tokenizer)
        if not ids:
            raise ConfigError(f"token text file {str(path)!r} holds no tokens (is it empty?)")
        bos = tokenizer.bos_token_id if prepend_bos else None
        width = context_size - (bos is not None)
        n_rows = len(ids) // width
        if n_rows == 0:
            raise ConfigError(
                f"{str(path)!r} gives {len(ids)} tokens, fewer than one row of {width} "
                f"(context_size={context_size}); use a longer text or a smaller context_size"
            )
        body = torch.tensor(ids[: n_rows * width], dtype=torch.int32).reshape(n_rows, width)
        if bos is not None:
            body = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.int32), body], dim=1)
        super().__init__(body)
        self.path = path
        self.prepend_bos = prepend_bos
        self._file_digest = file_digest
        self._tokenizer_name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))

    def fingerprint(self) -> dict[str, Any]:
        """File content hash, tokenizer, context size, BOS rule and the token digest."""
        return {
            **super().fingerprint(),
            "kind": "text_file",
            "file_blake2b": self._file_digest,
            "tokenizer": self._tokenizer_name,
            "prepend_bos": self.prepend_bos,
        }


def _tokenize_file(path: Path, tokenizer: Any) -> tuple[list[int], str]:
    ids: list[int] = []
    digest = hashlib.blake2b(digest_size=16)
    block: list[str] = []
    size = 0

    def flush() -> None:
        if block:
            # blocks are longer than the model's context on purpose (rows are cut later):
            # verbose=False drops transformers' "sequence length is longer than" notice
            text = "".join(block)
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            block.clear()

    with path.open(encoding="utf-8") as handle:
        for line in handle:
            digest.update(line.encode())
            block.append(line)
            size += len(line)
            if size >= _TEXT_BLOCK_CHARS:
                flush()
                size = 0
    flush()
    return ids, digest.hexdigest()


class ShardDirTokens:
    """Token sequences in a directory of ``*.safetensors`` shards, read lazily.

    Each shard (in sorted file-name order) holds one integer tensor ``tokens``
    ``[rows, context]``, with the same context in every shard; global index ``i``
    counts rows across shards in that order. Rows are read through memory-mapped
    slices, so nothing is loaded up front. Raises ``TokenFileNotFoundError`` for a
    missing directory and ``ConfigError`` for no shards, a shard without ``tokens``,
    or mismatched contexts.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise TokenFileNotFoundError(f"token shard directory {str(directory)!r} does not exist")
        self.files = sorted(self.directory.glob("*.safetensors"))
        if not self.files:
            raise ConfigError(f"{str(directory)!r} holds no *.safetensors token shards")
        rows, widths = [], set()
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                if SHARD_KEY not in handle.keys():  # noqa: SIM118 - not a dict
                    raise ConfigError(f"token shard {file.name!r} has no {SHARD_KEY!r} tensor")
                shape = handle.get_slice(SHARD_KEY).get_shape()
                dtype = handle.get_slice(SHARD_KEY).get_dtype()
            if len(shape) != 2 or not dtype.startswith(("I", "U")):
                raise ConfigError(
                    f"token shard {file.name!r}: {SHARD_KEY!r} must be an integer [rows, context] "
                    f"tensor, got {dtype} {shape}"
                )
            rows.append(shape[0])
            widths.add(shape[1])
        if len(widths) != 1:
            raise ConfigError(f"token shards in {str(directory)!r} mix context sizes {widths}")
        self._ctx = widths.pop()
        self._starts = torch.tensor([0, *rows]).cumsum(0)
        self.shard_rows = rows

    @property
    def n_sequences(self) -> int:
        return int(self._starts[-1])

    @property
    def context_size(self) -> int:
        return int(self._ctx)

    def sequences(self, indices: Int[Tensor, " n"]) -> Int[Tensor, "n ctx"]:
        """The rows at global ``indices`` as int64, read shard by shard."""
        indices = indices.cpu().long()
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < len(self):
            raise IndexError(f"sequence indices outside [0, {len(self)})")
        out = torch.empty((indices.numel(), self._ctx), dtype=torch.long)
        shard_of = torch.searchsorted(self._starts, indices, right=True) - 1
        for shard in shard_of.unique().tolist():
            where = (shard_of == shard).nonzero().squeeze(1)
            with safe_open(str(self.files[shard]), framework="pt") as handle:
                rows = handle.get_slice(SHARD_KEY)
                for slot, index in zip(where.tolist(), indices[where].tolist(), strict=True):
                    local = index - int(self._starts[shard])
                    out[slot] = rows[local : local + 1][0]
        return out

    def __len__(self) -> int:
        return self.n_sequences

    def fingerprint(self) -> dict[str, Any]:
        """Shard names and shapes, plus a digest of a few sampled rows of each shard."""
        sampled = {}
        for shard, (file, n) in enumerate(zip(self.files, self.shard_rows, strict=True)):
            picks = torch.linspace(0, n - 1, steps=min(n, 16)).long() + self._starts[shard]
            sampled[file.name] = self.sequences(picks)
        return {
            "kind": "shard_dir",
            "shards": [[f.name, n] for f, n in zip(self.files, self.shard_rows, strict=True)],
            "context_size": self._ctx,
            "digest": content_digest(sampled),
        }


def write_token_shards(tokens: Tensor, directory: str | Path, rows_per_shard: int) -> list[Path]:
    """Write ``tokens`` ``[n, ctx]`` as ``tokens_00000.safetensors``, ... for ``ShardDirTokens``.

    Returns the paths written. Each file is written atomically. Refuses a
    directory that already holds ``*.safetensors`` files, so stale shards never
    mix with new ones.
    """
    tokens = _checked_token_matrix(tokens, "tokens")
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.glob("*.safetensors")):
        raise ConfigError(f"{str(directory)!r} already holds .safetensors files; use a new one")
    paths = []
    for shard, start in enumerate(range(0, tokens.shape[0], rows_per_shard)):
        piece = tokens[start : start + rows_per_shard].cpu().contiguous()
        paths.append(save_atomic({SHARD_KEY: piece}, directory / f"tokens_{shard:05d}.safetensors"))
    return paths


def save_atomic(tensors: dict[str, Tensor], path: Path) -> Path:
    """Write a safetensors file atomically (``mitk.atomic``); the path."""
    on_cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda temp: save_file(on_cpu, temp))


def as_token_source(
    tokens: TokenSource | Tensor | str | Path,
    model: HookedTransformer,
    context_size: int | None = None,
) -> TokenSource:
    """A token source from a tensor, a text file (model's tokenizer), a shard directory, or as is.

    A text file is cut into rows of ``context_size`` (default: the model's
    ``n_ctx``) with the BOS rule of ``TextFileTokens``. Raises
    ``NoTokenizerError`` for a text file when the model has no tokenizer.
    """
    if isinstance(tokens, Tensor):
        return TensorTokens(tokens)
    if isinstance(tokens, (str, Path)):
        path = Path(tokens)
        if path.is_dir():
            return ShardDirTokens(path)
        if not path.exists():
            raise TokenFileNotFoundError(f"token source {str(path)!r} does not exist")
        if model.tokenizer is None:
            raise NoTokenizerError(
                f"the text file {str(path)!r} needs a tokenizer, but the model has none; "
                "attach one with model.set_tokenizer(...) or pass token ids"
            )
        return TextFileTokens(path, model.tokenizer, context_size or model.cfg.n_ctx)
    if isinstance(tokens, TokenSource):
        return tokens
    raise ConfigError(
        f"tokens must be a tensor, a text file, a shard directory or a TokenSource, "
        f"got {type(tokens).__name__}"
    )
