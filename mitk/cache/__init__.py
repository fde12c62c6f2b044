"""Activation caches and (in later work) the residual-stream decompositions read from them."""

from mitk.cache.activation_cache import ActivationCache, CachedModel, NotCachedError

__all__ = ["ActivationCache", "CachedModel", "NotCachedError"]
