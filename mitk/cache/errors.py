"""The errors a cache raises for its own reasons (everything else comes from ``mitk.errors``)."""

from __future__ import annotations

from mitk.errors import MitkError


class NotCachedError(MitkError, KeyError):
    """A valid hook name whose activation was not stored in this cache."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class CacheArgumentError(MitkError, ValueError):
    """An argument to a cache method is outside what the method accepts."""


class LayerOutOfRangeError(CacheArgumentError, IndexError):
    """A ``layer`` argument names no stream position of this model."""
