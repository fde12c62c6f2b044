"""Attribution patching: the first-order (gradient) estimate of activation patching.

Nanda (2023): the metric after patching a site is estimated as
``metric(base) + (source - base) · ∂metric/∂activation``, with the gradient
taken on the base run. One clean forward, one corrupted forward and one
backward give the estimate for every site, layer, position and head at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.analysis.patching.activation import PatchResult, activation_patch
from mitk.analysis.patching.engine import metric_fn
from mitk.analysis.patching.metrics import PositionMetric
from mitk.analysis.patching.pair import Direction, check_patch_inputs, metric_at
from mitk.analysis.patching.sites import Granularity, Site, site_for, unit_granularity
from mitk.shapes import Float, Int


def _reduce(site: Site, per: str, contribution: Tensor) -> Tensor:
    """Sum a ``[batch, ...]`` per-element contribution down to the granularity's axes."""
    keeps: dict[str, list[int | None]] = {
        "layer": [],
        "pos": [site.pos_axis],
        "head": [site.head_axis],
        "head_pos": [site.head_axis, site.pos_axis],
    }
    per = unit_granularity(per)  # experts sit on the unit axis as heads do
    keep = keeps[per]
    dims = [d for d in range(1, contribution.ndim) if d not in keep]
    summed = contribution.sum(dims) if dims else contribution
    if per == "head_pos" and site.head_axis is not None and site.head_axis > site.pos_axis:
        summed = summed.transpose(1, 2)  # always [batch, head, pos]
    return summed


def attribution_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Any,
    site: str = "resid_pre",
    per: Granularity = "layer",
    *,
    direction: Direction = "denoising",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> PatchResult:
    """Gradient estimate of ``activation_patch`` with the same arguments and result layout.

    ``values`` holds the estimated patched metric, ``base + (source - base) ·
    grad``, so it reads like the exact result. Exact for sites the metric
    depends on linearly; an estimate elsewhere (compare with
    ``compare_with_activation_patching``).
    """
    check_patch_inputs(clean_tokens, corrupted_tokens, attention_mask, direction)
    where = site_for(site, per)
    batch, seq = clean_tokens.shape
    fn, answer_pos = metric_fn(metric, batch, seq)
    layers = where.layers(model)
    hooks = [where.hook(layer) for layer in layers]
    denoising = direction == "denoising"
    base_tokens, source_tokens = (
        (corrupted_tokens, clean_tokens) if denoising else (clean_tokens, corrupted_tokens)
    )
    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(
            source_tokens, attention_mask=attention_mask, names_filter=hooks
        )
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        act.retain_grad()
        acts[hook.name] = act

    with torch.enable_grad():
        base_logits = model.run_with_hooks(
            base_tokens, attention_mask=attention_mask, fwd_hooks=[(h, keep) for h in hooks]
        )
        clean_logits = source_logits if denoising else base_logits.detach()
        if isinstance(metric, PositionMetric) and answer_pos is not None:
            metric.prepare(clean_logits[torch.arange(batch), answer_pos])
        base_metric = metric_at(fn, base_logits, answer_pos)
        base_metric.sum().backward()  # prompts are independent: each row gets its own gradient
    model.zero_grad(set_to_none=True)
    source_metric = metric_at(fn, source_logits, answer_pos)
    clean_metric, corrupt_metric = (
        (source_metric, base_metric.detach())
        if denoising
        else (base_metric.detach(), source_metric)
    )
    per_layer = []
    for hook in hooks:
        act = acts[hook]
        grad = act.grad if act.grad is not None else torch.zeros_like(act)
        contribution = (source_cache[hook] - act.detach()) * grad
        per_layer.append(_reduce(where, per, contribution))
    stacked = torch.stack(per_layer, 1)  # [batch, layer, ...]
    shift = base_metric.detach().view(batch, *[1] * (stacked.ndim - 1))
    return PatchResult(
        per_prompt=(stacked + shift).detach(),
        clean=clean_metric.detach(),
        corrupted=corrupt_metric.detach(),
        site=site,
        per=per,
        direction=direction,
        layers=layers,
    )


def compare_with_activation_patching(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Any,
    site: str = "resid_pre",
    per: Granularity = "layer",
    **kwargs: Any,
) -> tuple[float, PatchResult, PatchResult]:
    """Pearson correlation of attribution vs exact activation patching, and both results."""
    estimate = attribution_patch(model, clean_tokens, corrupted_tokens, metric, site, per, **kwargs)
    exact = activation_patch(model, clean_tokens, corrupted_tokens, metric, site, per, **kwargs)
    a, b = estimate.values.flatten().double(), exact.values.flatten().double()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return float(r), estimate, exact


def effect_sizes(result: PatchResult) -> Float[Tensor, "..."]:
    """Patched minus base metric, per cell (mean over prompts)."""
    base = result.corrupted if result.direction == "denoising" else result.clean
    return result.values - base.mean()
