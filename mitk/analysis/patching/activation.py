"""Activation patching: swap one run's activation into another and measure what it restores.

Denoising (the default) runs the corrupted prompts and patches in clean
activations; noising runs the clean prompts and patches in corrupted ones.
Every patched variant of a sweep goes through the batched engine, and the
numbers equal a one-forward-per-variant loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mitk.analysis.patching.engine import BaseRun, Variant, replays_from_start, run_variants
from mitk.analysis.patching.pair import Direction, check_patch_inputs, run_pair
from mitk.analysis.patching.sites import Granularity, site_for, unit_granularity
from mitk.analysis.patching.uncertainty import bootstrap_interval, sign_flip_test
from mitk.hooks import name
from mitk.model.inputs import global_tokens_of
from mitk.shapes import Float, Int

AXES: dict[str, tuple[str, ...]] = {
    "layer": ("layer",),
    "pos": ("layer", "pos"),
    "head": ("layer", "head"),
    "head_pos": ("layer", "head", "pos"),
    "expert": ("layer", "expert"),
    "expert_pos": ("layer", "expert", "pos"),
}


@dataclass(frozen=True)
class PatchResult:
    """Metric after each patch, with the unpatched baselines.

    ``per_prompt`` is ``[batch, layer, ...]`` with one axis per granularity
    dimension (``axes`` names them); ``values`` averages over prompts.
    ``clean``/``corrupted`` are the metric on the unpatched runs, per prompt.
    A NaN in ``per_prompt`` is a cell that prompt lacks (a position past a
    shorter prompt, in results gathered from a sweep): means, intervals and
    tests use the prompts that have the cell.
    """

    per_prompt: Float[Tensor, "batch ..."]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    site: str
    per: str
    direction: str
    layers: list[int]

    @property
    def axes(self) -> tuple[str, ...]:
        """Names of the axes of ``values`` (``per_prompt`` has ``batch`` first)."""
        return AXES[self.per]

    @property
    def values(self) -> Float[Tensor, "..."]:
        """Mean over prompt pairs of the patched metric (over those that have the cell)."""
        return self.per_prompt.nanmean(0)

    def normalized(self) -> Float[Tensor, "..."]:
        """``(patched - corrupted) / (clean - corrupted)`` on prompt means: 1 = fully restored.

        Means are taken before dividing, so one prompt whose baselines
        coincide cannot blow the ratio up.
        """
        clean, corrupted = self.clean.mean(), self.corrupted.mean()
        return (self.values - corrupted) / (clean - corrupted)

    def confidence_interval(
        self,
        confidence: float = 0.95,
        *,
        normalized: bool = False,
        resamples: int = 2000,
        seed: int = 0,
    ) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
        """``(low, high)`` bootstrap interval over prompts of ``values`` (or of ``normalized()``).

        Percentile bootstrap, seeded; the normalised interval resamples each
        prompt's patched, clean and corrupted metric together. See
        ``mitk.analysis.patching.uncertainty``.
        """
        baselines = (self.clean, self.corrupted) if normalized else (None, None)
        return bootstrap_interval(
            self.per_prompt, *baselines, confidence=confidence, resamples=resamples, seed=seed
        )

    def p_values(self, *, resamples: int = 2000, seed: int = 0) -> Float[Tensor, "..."]:
        """Per cell, the sign-flip p-value that patching leaves the metric unchanged.

        Tests each prompt's patched metric against the same prompt's unpatched
        run: the corrupted run when denoising, the clean run when noising.
        Two-sided, uncorrected over cells (``uncertainty.benjamini_hochberg``
        controls the false discovery rate); exact for up to log2(resamples) prompts.
        """
        baseline = self.corrupted if self.direction == "denoising" else self.clean
        return sign_flip_test(self.per_prompt, baseline, resamples=resamples, seed=seed)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per layer/pos/head cell with raw and normalised value, CI and p.

        ``ci_low``/``ci_high`` bound ``value`` (95% bootstrap over prompts) and
        ``p_value`` is ``p_values()``, all with their default seeds.
        """
        values, normalized = self.values.cpu(), self.normalized().cpu()
        low, high = self.confidence_interval()
        grids = torch.meshgrid(*[torch.arange(n) for n in values.shape], indexing="ij")
        frame = pd.DataFrame(
            {axis: g.reshape(-1).tolist() for axis, g in zip(self.axes, grids, strict=True)}
        )
        frame["layer"] = [self.layers[i] for i in frame["layer"]]
        frame["value"] = values.reshape(-1).tolist()
        frame["normalized"] = normalized.reshape(-1).tolist()
        frame["ci_low"] = low.cpu().reshape(-1).tolist()
        frame["ci_high"] = high.cpu().reshape(-1).tolist()
        frame["p_value"] = self.p_values().cpu().reshape(-1).tolist()
        frame["site"], frame["direction"] = self.site, self.direction
        return frame


def _cells(per: Granularity, n_pos: int, n_heads: int) -> list[tuple[int | None, int | None]]:
    """(pos, head) of each variant within one layer, in the order ``values`` lays them out."""
    if per == "layer":
        return [(None, None)]
    if per == "pos":
        return [(p, None) for p in range(n_pos)]
    if per == "head":
        return [(None, h) for h in range(n_heads)]
    return [(p, h) for h in range(n_heads) for p in range(n_pos)]


def activation_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Any,
    site: str = "resid_pre",
    per: Granularity = "layer",
    *,
    direction: Direction = "denoising",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    layers: list[int] | None = None,
    memory_budget_gb: float = 2.0,
    global_attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> PatchResult:
    """Patch ``site`` at every layer (and position / head, per ``per``) and record ``metric``.

    ``metric`` is a ready-made metric (``mitk.analysis.patching.metrics``) or
    any callable from logits ``[batch, pos, d_vocab]`` to ``[batch]``. Clean
    and corrupted prompts must line up position by position; a shared
    ``attention_mask`` handles padding. ``memory_budget_gb`` bounds the
    activations of one batched forward (an estimate, fp32).

    Mixture-of-experts sites (``router_logits``, ``expert_out``, ``shared_out``)
    default to the MoE layers; ``per="expert"``/``"expert_pos"`` patch one
    expert's router logit or weighted write at a time.

    Heads: for ``k`` and ``v`` sites ``head`` indexes key-value heads (the
    hooked tensors keep ``n_key_value_heads`` under grouped-query attention),
    so patching one changes the keys or values every query head of its group
    reads; ``q``, ``z`` and ``pattern`` index query heads.

    Longformer models take the prompts' shared ``global_attention_mask``; their
    ``q_global``/``k_global``/``v_global`` sites are the global projections.
    """
    check_patch_inputs(clean_tokens, corrupted_tokens, attention_mask, direction)
    where = site_for(site, per)
    n_layers = model.cfg.n_layers
    layers = where.layers(model) if layers is None else list(layers)
    if any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers {layers} must lie in [0, {n_layers})")
    batch, seq = clean_tokens.shape
    first = min(layers)
    downstream = range(first, n_layers)  # the wavefront reads keys/values of every later layer
    # past keys enter attention after rotation, so rotary models replay hook_rot_k
    key_kind = "rot_k" if model.cfg.positional == "rotary" else "k"
    keyed = [] if replays_from_start(model) else downstream  # runs from 0 need no past keys
    names = [name("resid_pre", layer) for layer in downstream]
    names += [name(kind, layer) for kind in (key_kind, "v") for layer in keyed]
    names += [where.hook(layer) for layer in layers]
    runs = run_pair(model, clean_tokens, corrupted_tokens, metric, names, attention_mask,
                    global_attention_mask)  # fmt: skip
    denoising = direction == "denoising"
    base_cache, source_cache = runs.base_and_source(direction)
    valid = None if attention_mask is None else attention_mask.bool()
    global_tokens = global_tokens_of(global_attention_mask, model.cfg, (batch, seq), valid)
    base = BaseRun(
        resid_pre={layer: base_cache[name("resid_pre", layer)] for layer in downstream},
        keys={layer: base_cache[name(key_kind, layer)].transpose(1, 2) for layer in keyed},
        values={layer: base_cache[name("v", layer)].transpose(1, 2) for layer in keyed},
        base_site={layer: base_cache[where.hook(layer)] for layer in layers},
        source_site={layer: source_cache[where.hook(layer)] for layer in layers},
        attention_mask=None if attention_mask is None else attention_mask.bool(),
        answer_pos=runs.answer_pos,
        base_logits=runs.corrupt_logits if denoising else runs.clean_logits,
        base_metric=runs.corrupt_metric if denoising else runs.clean_metric,
        global_tokens=global_tokens,
    )
    n_heads = where.units(model)  # heads, or experts
    as_heads = unit_granularity(per)
    variants = [
        Variant(layer, pos, head)
        for layer in layers
        for pos, head in _cells(as_heads, seq, n_heads)
    ]
    out = run_variants(
        model, base, where, variants, runs.fn, memory_budget_gb * 2**30
    )  # [variant, batch]
    shape = {"layer": (), "pos": (seq,), "head": (n_heads,), "head_pos": (n_heads, seq)}[as_heads]
    per_prompt = out.T.reshape(batch, len(layers), *shape)
    return PatchResult(
        per_prompt=per_prompt.detach(),
        clean=runs.clean_metric,
        corrupted=runs.corrupt_metric,
        site=site,
        per=per,
        direction=direction,
        layers=layers,
    )
