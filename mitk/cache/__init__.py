"""Activation caches and (in later work) the residual-stream decompositions read from them."""

from mitk.cache.activation_cache import ActivationCache, CachedModel, NotCachedError
from mitk.cache.heads import expand_kv_heads
from mitk.cache.residual_stack import ResidualStack

__all__ = ["ActivationCache", "CachedModel", "NotCachedError", "ResidualStack", "expand_kv_heads"]
