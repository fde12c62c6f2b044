"""mitk: a mechanistic-interpretability toolkit for PyTorch transformers.

Subpackages load on first use (PEP 562), so ``import mitk`` then
``mitk.analysis.dla.logit_attribution`` or ``mitk.sae.train`` works without
importing them first, and ``import mitk`` does not pay for the SAE, plotting
or sweep code until it is touched.
"""

from importlib import import_module as _import_module
from types import ModuleType as _ModuleType

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

# Reached as attributes of `mitk`; `cli` is left out: nothing in the library uses it.
_SUBMODULES = (
    "analysis",
    "atomic",
    "cache",
    "checkpoint",
    "config",
    "errors",
    "hooks",
    "model",
    "sae",
    "sequences",
    "shapes",
    "sweeps",
    "train",
    "utils",
    "viz",
)


def __getattr__(name: str) -> _ModuleType:
    """Import a subpackage the first time it is used as ``mitk.<name>``."""
    if name in _SUBMODULES:
        return _import_module(f"{__name__}.{name}")  # also binds it here: no second call
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """What is defined here plus the subpackages not imported yet (for tab completion)."""
    return sorted({*globals(), *_SUBMODULES})
