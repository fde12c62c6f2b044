"""Ablations as hooks: zero, mean over a reference batch, and resample from a reference batch.

Each builder returns a ``(hook_name, fn)`` pair for ``run_with_hooks``,
``model.hooks(...)`` or a patching sweep's surroundings. ``pos``/``head``
restrict the ablation to one position and/or head; otherwise the whole
activation is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mitk.analysis.patching.sites import SITES, Site
from mitk.errors import ShapeMismatchError
from mitk.hooks import HookPoint
from mitk.shapes import Int

HookSpec = tuple[str, Callable[[Tensor, HookPoint], Tensor]]


def site_of(hook_name: str) -> Site:
    """The axes of the activation at ``hook_name`` (model-level hooks are ``[batch, pos, ...]``)."""
    kind = hook_name.rsplit("hook_", 1)[-1]
    return SITES.get(kind, Site(kind, kind, pos_axis=1))


def _region(site: Site, pos: int | None, head: int | None, ndim: int) -> tuple[Any, ...]:
    index: list[Any] = [slice(None)] * ndim
    if pos is not None:
        index[site.pos_axis] = pos
    if head is not None:
        if site.head_axis is None:
            raise ValueError(f"{site.short!r} activations have no head axis")
        index[site.head_axis] = head
    return tuple(index)


def _replacing(hook_name: str, pos: int | None, head: int | None,
               values: Callable[[Tensor], Tensor]) -> HookSpec:  # fmt: skip
    site = site_of(hook_name)

    def ablate(act: Tensor, hook: HookPoint) -> Tensor:
        region = _region(site, pos, head, act.ndim)
        out = act.clone()
        out[region] = values(act)[region]
        return out

    return hook_name, ablate


def zero_ablation(hook_name: str, pos: int | None = None, head: int | None = None) -> HookSpec:
    """Hook setting the activation (or one position/head of it) to zero."""
    return _replacing(hook_name, pos, head, torch.zeros_like)


def _reference(model: Any, tokens: Tensor, hook_name: str, mask: Tensor | None) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=hook_name)
    return cache[hook_name]


def mean_ablation(
    model: Any,
    reference_tokens: Int[Tensor, "ref pos"],
    hook_name: str,
    pos: int | None = None,
    head: int | None = None,
    per_position: bool = True,
) -> HookSpec:
    """Hook replacing the activation with its mean over a reference batch.

    ``per_position=True`` keeps one mean per position (prompts must then be
    as long as the reference); ``False`` also averages over positions.
    """
    reference = _reference(model, reference_tokens, hook_name, None)
    site = site_of(hook_name)
    mean = reference.mean(0, keepdim=True)
    if not per_position:
        mean = mean.mean(site.pos_axis, keepdim=True)

    def values(act: Tensor) -> Tensor:
        if per_position and act.shape[site.pos_axis] != mean.shape[site.pos_axis]:
            raise ShapeMismatchError(
                f"mean ablation of {hook_name!r} is per position over {mean.shape[site.pos_axis]} "
                f"positions but the input has {act.shape[site.pos_axis]}; use per_position=False"
            )
        return mean.expand_as(act)

    return _replacing(hook_name, pos, head, values)


def resample_ablation(
    model: Any,
    reference_tokens: Int[Tensor, "ref pos"],
    hook_name: str,
    pos: int | None = None,
    head: int | None = None,
    seed: int = 0,
) -> HookSpec:
    """Hook replacing each prompt's activation with a random reference prompt's (seeded).

    The reference prompts must have the same length as the ablated ones.
    """
    reference = _reference(model, reference_tokens, hook_name, None)
    gen = torch.Generator().manual_seed(seed)

    def values(act: Tensor) -> Tensor:
        if act.shape[1:] != reference.shape[1:]:
            raise ShapeMismatchError(
                f"resample ablation of {hook_name!r}: reference activations are "
                f"{tuple(reference.shape[1:])} per prompt, the input's are {tuple(act.shape[1:])}"
            )
        picks = torch.randint(0, reference.shape[0], (act.shape[0],), generator=gen)
        return reference[picks.to(reference.device)]

    return _replacing(hook_name, pos, head, values)
