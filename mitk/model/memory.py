"""How much memory a model needs, known from its config before any weight is allocated.

The count is exact: one block of each kind (dense, mixture of experts) and the
embeddings are built on the ``meta`` device, which allocates nothing, and their
parameters are counted, so every variant (MLA, experts, sinks, norms) is covered
by the modules themselves rather than by a second formula. A model is built in
float32 and then cast, so each parameter costs ``max(4, dtype size)`` bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mitk.config import TORCH_DTYPES, TransformerConfig
from mitk.errors import ConfigError, ModelTooLargeError

LIMIT_VARIABLE = "MITK_MAX_MEMORY_GB"
GB = 1024**3


def parameter_count(cfg: TransformerConfig) -> int:
    """Parameters a ``HookedTransformer`` built from ``cfg`` holds (counted on ``meta``)."""
    from mitk.model.block import block_class
    from mitk.model.embed import Embed, PosEmbed, TokenTypeEmbed, Unembed
    from mitk.model.norms import make_norm

    kinds = {layer: count for layer, count in _layer_kinds(cfg).items() if count}
    with torch.device("meta"):
        outer: list[nn.Module] = [Embed(cfg), Unembed(cfg)]
        if cfg.positional == "learned":
            outer.append(PosEmbed(cfg))
        if cfg.token_types:
            outer.append(TokenTypeEmbed(cfg))
        outer += [make_norm(cfg)] * (int(cfg.embed_norm) + int(cfg.final_norm))
        total = sum(_numel(m) for m in outer)
        for layer, count in kinds.items():
            total += count * _numel(block_class(cfg, layer)(cfg, layer))
    return total


def estimate_bytes(cfg: TransformerConfig, parameters: int | None = None) -> int:
    """Bytes of memory building ``cfg``'s model takes at its peak (float32 build, then cast).

    ``parameters`` is ``parameter_count(cfg)`` when the caller has it already.
    """
    per_parameter = max(TORCH_DTYPES[cfg.dtype].itemsize, torch.float32.itemsize)
    return (parameter_count(cfg) if parameters is None else parameters) * per_parameter


def available_bytes() -> int | None:
    """Memory the machine has free now (psutil, else /proc/meminfo); None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit(max_memory_gb: float | None = None) -> tuple[int | None, str]:
    """The byte limit to hold a model to, and where it came from.

    ``max_memory_gb`` wins, then the ``MITK_MAX_MEMORY_GB`` environment variable,
    then the memory available now (None where that is unknown).
    """
    if max_memory_gb is None and os.environ.get(LIMIT_VARIABLE, "").strip():
        raw = os.environ[LIMIT_VARIABLE]
        try:
            max_memory_gb = float(raw)
        except ValueError as err:
            raise ConfigError(f"{LIMIT_VARIABLE}={raw!r} is not a number of GB") from err
        source = f"{LIMIT_VARIABLE}={raw}"
    else:
        source = f"max_memory_gb={max_memory_gb}"
    if max_memory_gb is not None:
        if isinstance(max_memory_gb, bool) or not max_memory_gb > 0:
            raise ConfigError(f"{source} must be a positive number of GB")
        return int(max_memory_gb * GB), source
    return available_bytes(), "the memory available now"


def ensure_fits(
    cfg: TransformerConfig,
    max_memory_gb: float | None = None,
    *,
    extra_bytes: int = 0,
    what: str = "the model",
) -> int:
    """Raise ``ModelTooLargeError`` if building ``cfg`` (plus ``extra_bytes``) exceeds the limit.

    ``extra_bytes`` is memory the caller holds alongside the model, such as the
    checkpoint tensors being loaded. Returns the estimate in bytes. Parameters on a
    GPU are counted against the same limit: the model is built on the CPU first.
    """
    parameters = parameter_count(cfg)  # counted once: the message quotes it too
    return ensure_parameters_fit(parameters, cfg.dtype, max_memory_gb, extra_bytes=extra_bytes,
                                 what=what)  # fmt: skip


def ensure_parameters_fit(
    parameters: int,
    dtype: str,
    max_memory_gb: float | None = None,
    *,
    extra_bytes: int = 0,
    what: str = "the model",
) -> int:
    """``ensure_fits`` for a parameter count already known (models other than decoder stacks)."""
    per_parameter = max(TORCH_DTYPES[dtype].itemsize, torch.float32.itemsize)
    need = parameters * per_parameter + extra_bytes
    limit, source = memory_limit(max_memory_gb)
    if limit is not None and need > limit:
        loading = f" including {extra_bytes / GB:.2f} GB of weight files" if extra_bytes else ""
        raise ModelTooLargeError(
            f"{what} needs about {need / GB:.2f} GB ({parameters:,} parameters as "
            f"{dtype}{loading}), more than {limit / GB:.2f} GB ({source}); set "
            f"max_memory_gb= or {LIMIT_VARIABLE} to allow more"
        )
    return need


def _layer_kinds(cfg: TransformerConfig) -> dict[int, int]:
    """A representative layer index of each block kind -> how many blocks are of that kind."""
    if cfg.moe is None or cfg.moe.layers is None:
        return {0: cfg.n_layers}
    moe = sorted(set(cfg.moe.layers))
    dense = next((i for i in range(min(cfg.n_layers, len(moe) + 1)) if i not in moe), None)
    kinds = {moe[0]: len(moe)} if moe else {}
    if dense is not None:
        kinds[dense] = cfg.n_layers - len(moe)
    return kinds


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
