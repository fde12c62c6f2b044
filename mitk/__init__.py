"""mitk: a mechanistic-interpretability toolkit for PyTorch transformers."""

from mitk import errors, hooks
from mitk.cache import ActivationCache
from mitk.config import TransformerConfig
from mitk.model import EncoderDecoderConfig, HookedEncoderDecoder, HookedTransformer

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "EncoderDecoderConfig",
    "HookedEncoderDecoder",
    "HookedTransformer",
    "TransformerConfig",
    "errors",
    "hooks",
]
