"""Which layers, positions, batch rows and neurons a cache method reads: arguments checked once.

TransformerLens's cache methods take ``layer`` in ``[0, n_layers]`` (the
stream entering that block; ``n_layers`` is the stream entering the unembed)
with ``None`` and ``-1`` meaning ``n_layers``; here every negative layer counts
from that end (``-2`` is ``n_layers - 1``). Position, batch and neuron
selections are ``mitk.utils.Slice`` inputs. Everything else raises a
``CacheArgumentError`` that names the argument.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from mitk.cache.errors import CacheArgumentError, LayerOutOfRangeError
from mitk.utils import Slice

SliceLike: TypeAlias = Any
"""A ``pos_slice`` / ``batch_slice`` / ``neuron_slice``: None (everything), an int, a
``(start, stop[, step])`` tuple, a ``slice``, a list/tensor/array of indices, or a
``mitk.utils.Slice``. Checked by ``as_slice`` rather than by the annotation, so a wrong
type raises ``CacheArgumentError`` with or without runtime type checking."""


def resolve_layer(layer: int | None, n_layers: int, what: str = "layer") -> int:
    """``layer`` as a stream position in ``[0, n_layers]``; None and negatives count from the end.

    ``n_layers`` is the stream entering the unembed (after the last block).
    """
    if layer is None:
        return n_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise CacheArgumentError(f"{what} must be an int or None, got {layer!r}")
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise LayerOutOfRangeError(
            f"{what}={layer} is outside [{-n_layers - 1}, {n_layers}] for a {n_layers}-layer "
            f"model ({n_layers} or -1 is the stream entering the unembed)"
        )
    return resolved


def block_index(layer: int, n_layers: int) -> int:
    """A block index in ``[0, n_layers)``; negatives count from the last block (cache keys)."""
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        raise LayerOutOfRangeError(
            f"layer {layer} is outside [{-n_layers}, {n_layers - 1}] for a {n_layers}-layer model"
        )
    return resolved


def as_slice(value: SliceLike, what: str = "pos_slice") -> Slice:
    """``value`` as a ``Slice`` (an int picks one index and drops that dim, as in TL)."""
    if isinstance(value, Slice):
        return value
    try:
        return Slice(value)
    except ValueError as err:  # Slice says what it accepts
        raise CacheArgumentError(f"{what}: {err}") from None


def as_kept_slice(value: SliceLike, what: str = "neuron_slice") -> Slice:
    """As ``as_slice``, but an int selects ``[int]`` so the dim stays (neuron stacks)."""
    if isinstance(value, Slice):
        return Slice.unwrap(value.slice) if value.mode == "int" else value
    try:
        return Slice.unwrap(value)
    except ValueError as err:
        raise CacheArgumentError(f"{what}: {err}") from None
