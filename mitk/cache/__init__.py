"""Activation caches and the residual-stream decompositions read from them."""

from mitk.cache.activation_cache import ActivationCache, CachedModel, NotCachedError
from mitk.cache.heads import expand_kv_heads
from mitk.cache.residual_stack import ResidualStack
from mitk.cache.writes import StreamWrites, head_writes, neuron_writes

__all__ = [
    "ActivationCache",
    "CachedModel",
    "NotCachedError",
    "ResidualStack",
    "StreamWrites",
    "expand_kv_heads",
    "head_writes",
    "neuron_writes",
]
