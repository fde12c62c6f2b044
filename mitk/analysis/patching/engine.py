"""The batched patching engine: many patched copies of one run, with only the work they need.

Three kinds of reuse make a sweep cheaper than one forward per variant:

- A variant that patches layer ``L`` agrees with the base run before ``L``,
  so it enters the computation at block ``L`` from the base run's cached
  ``resid_pre`` (the wavefront: at block ``l`` the batch holds every variant
  whose layer is ``<= l``).
- In a causal model, positions before the first one a patch changes are
  unchanged in every later layer, so only the suffix is recomputed and its
  attention reads the prefix keys and values from the base run's cache.
- A patch that writes exactly the values already there changes nothing; its
  metric is the base run's without any forward.

Numbers equal a plain one-forward-per-variant loop up to float rounding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mitk.analysis.patching.metrics import PositionMetric
from mitk.analysis.patching.sites import Site
from mitk.hooks import HookPoint
from mitk.shapes import Float, Int


@dataclass(frozen=True)
class Variant:
    """One patch: the site at ``layer``, restricted to ``pos`` and/or ``head`` when given."""

    layer: int
    pos: int | None = None
    head: int | None = None


@dataclass(frozen=True)
class BaseRun:
    """What the engine reads from the run being patched and the run patched in from.

    Per layer: the base run's ``resid_pre``, keys and values (``[batch,
    kv_head, pos, d_head]``) and site activation, and the source run's site
    activation. ``answer_pos`` is None when the metric reads every position.
    """

    resid_pre: dict[int, Tensor]
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    base_site: dict[int, Tensor]
    source_site: dict[int, Tensor]
    attention_mask: Tensor | None
    answer_pos: Int[Tensor, " batch"] | None
    base_logits: Tensor  # [batch, d_vocab] at answer_pos, or [batch, pos, d_vocab]
    base_metric: Float[Tensor, " batch"]
    global_tokens: Tensor | None = None  # Longformer's global tokens, [batch, pos]


def _region(site: Site, variant: Variant, ndim: int) -> tuple[Any, ...]:
    index: list[Any] = [slice(None)] * ndim
    if variant.pos is not None:
        index[site.pos_axis] = slice(variant.pos, variant.pos + 1)
    if variant.head is not None and site.head_axis is not None:
        index[site.head_axis] = slice(variant.head, variant.head + 1)
    return tuple(index)


def first_changed_position(site: Site, base: BaseRun, variant: Variant, causal: bool) -> int | None:
    """The earliest position the patch alters (None: it alters nothing, so it is a no-op)."""
    region = _region(site, variant, base.source_site[variant.layer].ndim)
    changed = base.source_site[variant.layer][region] != base.base_site[variant.layer][region]
    along_pos = changed.movedim(site.pos_axis, -1).reshape(-1, changed.shape[site.pos_axis])
    hits = along_pos.any(0).nonzero()
    if hits.numel() == 0:
        return None
    offset = variant.pos if variant.pos is not None else 0
    return int(hits[0]) + offset if causal else 0


def bytes_per_token(model: Any, seq: int) -> int:
    """Rough fp32 activation bytes one token costs in a forward (for chunking, not accounting)."""
    cfg = model.cfg
    return 4 * (10 * cfg.d_model + 2 * cfg.d_mlp + 2 * cfg.n_heads * seq)


def variants_per_chunk(model: Any, batch: int, seq: int, memory_budget_bytes: float) -> int:
    """How many variants fit in one batched forward under the budget (at least one)."""
    return max(1, int(memory_budget_bytes // (batch * seq * bytes_per_token(model, seq))))


def _patcher(
    site: Site, source: Tensor, entering: Sequence[Variant], start: int
) -> Callable[[Tensor, HookPoint], Tensor]:
    """Hook writing ``source`` into the rows of the variants entering at this layer (the last)."""
    batch = source.shape[0]

    def patch(act: Tensor, hook: HookPoint) -> Tensor:
        act = act.clone()  # the incoming tensor may be shared with the cached base run
        new = act[act.shape[0] - len(entering) * batch :].view(len(entering), batch, *act.shape[1:])
        for row, variant in enumerate(entering):
            shifted = Variant(variant.layer, None if variant.pos is None else variant.pos - start,
                              variant.head)  # fmt: skip
            region = _region(site, shifted, source.ndim)
            new[row][region] = source[region]
        return act

    return patch


def _run_wavefront(
    model: Any, site: Site, base: BaseRun, chunk: Sequence[Variant], start: int
) -> Float[Tensor, "rows pos d_model"]:
    """Final residual suffix (positions ``start..``) of each variant in ``chunk``, in order."""
    batch, seq = base.resid_pre[chunk[0].layer].shape[:2]
    by_layer: dict[int, list[Variant]] = defaultdict(list)
    for variant in chunk:
        by_layer[variant.layer].append(variant)
    order: list[Variant] = []
    x: Tensor | None = None
    for layer in range(min(by_layer), model.cfg.n_layers):
        entering = by_layer.get(layer, [])
        hooks = []
        if entering:
            order += entering
            fresh = base.resid_pre[layer][:, start:].repeat(len(entering), 1, 1)
            x = fresh if x is None else torch.cat([x, fresh])
            source = base.source_site[layer].narrow(site.pos_axis, start, seq - start)
            hooks = [(site.hook(layer), _patcher(site, source, entering, start))]
        assert x is not None
        copies = x.shape[0] // batch
        key_valid = None if base.attention_mask is None else base.attention_mask.repeat(copies, 1)
        past = {}
        if start > 0:  # the unchanged prefix: its keys and values are the base run's
            past[layer] = (base.keys[layer][:, :, :start].repeat(copies, 1, 1, 1),
                           base.values[layer][:, :, :start].repeat(copies, 1, 1, 1))  # fmt: skip
        extra = {}
        if base.global_tokens is not None:  # only Longformer models take (and need) them
            extra["global_tokens"] = base.global_tokens.repeat(copies, 1)
        ctx = model.forward_context(
            seq - start, key_valid, start=layer, stop=layer + 1, past=past, **extra
        )
        with model.hooks(fwd_hooks=hooks):
            x = model.run_blocks(x, ctx)
    assert x is not None
    position = {id(v): i for i, v in enumerate(order)}
    rows = torch.tensor([position[id(v)] for v in chunk])
    return x.view(len(order), batch, *x.shape[1:])[rows].flatten(0, 1)


def _metric_of_suffix(
    model: Any,
    base: BaseRun,
    final: Tensor,
    n_variants: int,
    start: int,
    metric: Callable[[Tensor], Tensor],
) -> Float[Tensor, "variant batch"]:
    batch = base.base_metric.shape[0]
    per_variant = final.view(n_variants, batch, *final.shape[1:])
    if base.answer_pos is None:  # full-logit metric: prefix logits are the base run's
        logits = model.unembed(model.ln_final(final)).view(
            n_variants, batch, -1, base.base_logits.shape[-1]
        )
        prefix = base.base_logits[:, :start]
        return torch.stack([metric(torch.cat([prefix, lg], dim=1)) for lg in logits])
    in_suffix = base.answer_pos >= start
    pick = (base.answer_pos - start).clamp(min=0)
    hidden = per_variant[:, torch.arange(batch), pick]  # [variant, batch, d_model]
    logits = model.unembed(model.ln_final(hidden))
    out = []
    for row in logits:
        row = torch.where(in_suffix[:, None], row, base.base_logits)
        out.append(metric(row))
    return torch.stack(out)


# A forward over fewer tokens than this per block is dominated by reading the weights, not by
# arithmetic: small start groups are merged (at the earliest start) until they reach it.
MIN_TOKENS_PER_FORWARD = 1024


def merge_small_groups(
    groups: dict[int, list[int]], batch: int, seq: int
) -> list[tuple[int, list[int]]]:
    """Merge consecutive start groups into buckets worth a batched forward.

    A variant may always start earlier than its first changed position (the
    recomputed positions come out unchanged), so merging trades a little
    extra work for matmuls large enough to run near peak.
    """
    buckets: list[tuple[int, list[int]]] = []
    for start, members in sorted(groups.items()):
        if buckets:
            first, current = buckets[-1]
            if len(current) * batch * (seq - first) < MIN_TOKENS_PER_FORWARD:
                current.extend(members)
                continue
        buckets.append((start, list(members)))
    return buckets


def replays_from_start(model: Any) -> bool:
    """Whether every patched run must start at position 0: a recurrent layer (a state-space
    or RWKV mixer, or linear attention) carries a state from the prefix, not keys and values
    that a suffix-only run could be handed."""
    cfg = model.cfg
    return cfg.kernel_attention or any(cfg.has_mixer(layer) for layer in range(cfg.n_layers))


def run_variants(
    model: Any,
    base: BaseRun,
    site: Site,
    variants: Sequence[Variant],
    metric: Callable[[Tensor], Tensor],
    memory_budget_bytes: float,
) -> Float[Tensor, "variant batch"]:
    """The metric of every variant, per prompt, in the order given."""
    batch, seq = base.base_metric.shape[0], next(iter(base.resid_pre.values())).shape[1]
    results = base.base_metric.expand(len(variants), batch).clone()
    # Hooks the caller attached (e.g. an ablation at some position) index absolute positions,
    # which a suffix-only run would shift: with any attached, every run starts at position 0.
    from_start = replays_from_start(model) or any(
        point.has_hooks for point in model.hook_dict.values()
    )
    groups: dict[int, list[int]] = defaultdict(list)
    for index, variant in enumerate(variants):
        start = first_changed_position(site, base, variant, model.cfg.causal)
        if start is not None:  # None: the patch writes what is already there
            groups[0 if from_start else start].append(index)
    with torch.no_grad():
        for start, members in merge_small_groups(groups, batch, seq):
            per_chunk = variants_per_chunk(model, batch, seq - start, memory_budget_bytes)
            for lo in range(0, len(members), per_chunk):
                indices = members[lo : lo + per_chunk]
                chunk = [variants[i] for i in indices]
                final = _run_wavefront(model, site, base, chunk, start)
                results[indices] = _metric_of_suffix(model, base, final, len(chunk), start, metric)
    return results


def metric_fn(
    metric: Any, batch: int, seq: int
) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
    """The callable to apply and the answer positions (None when it reads every position)."""
    if isinstance(metric, PositionMetric):
        return metric, metric.index(batch, seq)
    if not callable(metric):
        raise TypeError(f"metric must be callable or a PositionMetric, got {type(metric).__name__}")
    return metric, None
