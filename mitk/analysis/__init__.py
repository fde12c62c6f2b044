"""Analyses that read a model and its caches: DLA, lens, patching, circuits, composition, detectors.

Each analysis is its own submodule, imported on first use (PEP 562): after
``import mitk.analysis``, ``mitk.analysis.dla.logit_attribution`` just works.
"""

from importlib import import_module as _import_module
from pkgutil import iter_modules as _iter_modules
from types import ModuleType as _ModuleType

# Found on disk, so a new analysis module is reachable without editing this file.
_SUBMODULES = frozenset(info.name for info in _iter_modules(__path__))


def __getattr__(name: str) -> _ModuleType:
    """Import an analysis submodule the first time it is used as ``mitk.analysis.<name>``."""
    if name in _SUBMODULES:
        return _import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """What is defined here plus the analyses not imported yet."""
    return sorted({*globals(), *_SUBMODULES})
