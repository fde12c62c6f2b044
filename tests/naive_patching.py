"""Activation patching the slow way, one forward per cell: the oracle the engine is tested by."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mitk.hooks import name


def naive_patch(
    model: Any,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    site: str,
    n_pos: int,
    layers: list[int] | None = None,
) -> torch.Tensor:
    """``[batch, layer, pos]``: the corrupted run with one cell of ``site`` set to clean, at
    each of ``layers`` (None: every layer)."""
    _, clean_cache = model.run_with_cache(clean)
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    out = torch.zeros(clean.shape[0], len(layers), n_pos)
    for row, layer in enumerate(layers):
        for pos in range(n_pos):

            def put(act: torch.Tensor, hook: Any, layer: int = layer, pos: int = pos) -> Any:
                act = act.clone()
                act[:, pos] = clean_cache[name(site, layer)][:, pos]
                return act

            patched = model.run_with_hooks(corrupt, fwd_hooks=[(name(site, layer), put)])
            out[:, row, pos] = metric(patched)
    return out


def patched_both_ways(
    model: Any, clean: torch.Tensor, changed: int, site: str
) -> tuple[Any, torch.Tensor]:
    """``activation_patch`` per position of ``site`` (a logit difference at the last position),
    with ``clean``'s token at ``changed`` replaced in the corrupted prompt, and the oracle's
    at the layers the engine patched (a hybrid's attention sites: its attention layers)."""
    from mitk.analysis.patching import activation_patch

    corrupt = clean.clone()
    corrupt[:, changed] = (corrupt[:, changed] + 5) % model.cfg.d_vocab

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 3] - logits[:, -1, 5]

    with torch.no_grad():
        result = activation_patch(model, clean, corrupt, metric, site, "pos")
        expected = naive_patch(model, clean, corrupt, metric, site, clean.shape[1], result.layers)
    return result, expected
