"""Uncertainty over prompts: bootstrap confidence intervals and sign-flip tests for patching cells.

Both treat the prompts (pairs) as the sample and every cell (layer, position,
head...) alike, and are vectorised: resamples are rows of one weight matrix
multiplied into ``per_prompt``, chunked over cells to bound memory. Both are
seeded, so the same result gives the same numbers.

- ``bootstrap_interval``: percentile interval of the mean over prompts (or of
  the normalised recovery, resampling each prompt's patched, clean and
  corrupted values together).
- ``sign_flip_test``: per cell, a two-sided test of "patching does not change
  the metric": under that null each prompt's difference from its unpatched run
  is as likely negative as positive, so randomly flipping the signs gives the
  null distribution of their mean. Exact (every sign pattern) when there are
  few enough prompts, else Monte Carlo with the ``(1 + hits) / (1 + resamples)``
  estimate, which never returns 0 and keeps the test valid. p-values are per
  cell and uncorrected; ``benjamini_hochberg`` controls the false discovery
  rate over a heatmap's cells.
- ``cell_table``: both, per cell, from a per-pair table such as the CLI's
  ``results.parquet`` (cells missing for some pairs use the pairs that have them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import torch
from torch import Tensor

from mitk.shapes import Bool, Float

CELLS_PER_CHUNK_ELEMENTS = 1 << 24  # resamples × cells held at once (128 MiB of float64)


def _chunks(n_cells: int, resamples: int) -> Iterator[slice]:
    step = max(1, CELLS_PER_CHUNK_ELEMENTS // max(1, resamples))
    for start in range(0, n_cells, step):
        yield slice(start, min(n_cells, start + step))


def _percentile(sorted_draws: Float[Tensor, "draw cell"], q: float) -> Float[Tensor, " cell"]:
    """Linear-interpolated ``q`` quantile of each column's finite draws (sorted, NaNs last).

    A column with no finite draw gives NaN.
    """
    finite = (~sorted_draws.isnan()).sum(0)
    position = q * (finite - 1).clamp_min(0).double()
    below = position.floor().long()
    above = (below + 1).clamp_max((finite - 1).clamp_min(0))
    frac = position - below
    low = sorted_draws.gather(0, below[None])[0]
    high = sorted_draws.gather(0, above[None])[0]
    return torch.where(finite > 0, low * (1 - frac) + high * frac, torch.nan)


def bootstrap_weights(
    n_prompts: int, resamples: int, seed: int, device: torch.device | str = "cpu"
) -> Float[Tensor, "resample prompt"]:
    """How often each prompt is drawn in each resample, divided by ``n_prompts`` (rows sum to 1)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_prompts, (resamples, n_prompts), generator=generator)
    counts = torch.zeros(resamples, n_prompts, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(counts))
    return (counts / n_prompts).to(device)


def bootstrap_interval(
    per_prompt: Float[Tensor, "batch ..."],
    clean: Float[Tensor, " batch"] | None = None,
    corrupted: Float[Tensor, " batch"] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """``(low, high)`` percentile bootstrap interval of each cell's mean over prompts.

    With ``clean`` and ``corrupted`` the interval is of the normalised recovery
    ``(mean patched - mean corrupted) / (mean clean - mean corrupted)``, each
    resample drawing whole prompts. One prompt gives a zero-width interval.
    NaN marks a cell a prompt does not have (a position past a shorter prompt):
    each mean is over the drawn prompts that have the cell.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if (clean is None) != (corrupted is None):
        raise ValueError("pass both clean and corrupted (for the normalised interval) or neither")
    batch = per_prompt.shape[0]
    values = per_prompt.detach().double().reshape(batch, -1)
    present = (~values.isnan()).double()
    values = values.nan_to_num(0.0)
    weights = bootstrap_weights(batch, resamples, seed, values.device)

    def means(w: Tensor, x: Tensor, have: Tensor) -> Tensor:
        return (w @ (x * have)) / (w @ have)  # over the drawn prompts that have each cell

    low = torch.empty(values.shape[1], dtype=torch.float64, device=values.device)
    high = torch.empty_like(low)
    tail = (1 - confidence) / 2
    for cells in _chunks(values.shape[1], resamples):
        have = present[:, cells]
        draws = means(weights, values[:, cells], have)
        if clean is not None and corrupted is not None:
            ones = torch.ones_like(have)
            c = means(weights, clean.detach().double().to(values.device)[:, None] * ones, have)
            r = means(weights, corrupted.detach().double().to(values.device)[:, None] * ones, have)
            draws = (draws - r) / (c - r)
        draws = draws.sort(0).values
        low[cells], high[cells] = _percentile(draws, tail), _percentile(draws, 1 - tail)
    shape = per_prompt.shape[1:]
    return low.reshape(shape), high.reshape(shape)


def _sign_patterns(
    n_prompts: int, resamples: int, seed: int
) -> tuple[Float[Tensor, "pattern prompt"], bool]:
    """Every sign pattern when ``2**n_prompts <= resamples`` (exact), else random ones."""
    if n_prompts < 63 and 2**n_prompts <= resamples:
        codes = torch.arange(2**n_prompts)[:, None]
        bits = (codes >> torch.arange(n_prompts)) & 1
        return (1 - 2 * bits).double(), True
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(2, (resamples, n_prompts), generator=generator)
    return (1 - 2 * bits).double(), False


def sign_flip_test(
    per_prompt: Float[Tensor, "batch ..."],
    baseline: Float[Tensor, " batch"],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Float[Tensor, "..."]:
    """Two-sided p-value per cell that the mean of ``per_prompt - baseline`` is zero (sign flips).

    ``baseline`` is each prompt's metric without the patch (the corrupted run
    when denoising). Exact over all ``2**batch`` sign patterns when that is at
    most ``resamples``; otherwise ``(1 + hits) / (1 + resamples)`` over random
    patterns. A cell where the patch changes no prompt gets p = 1. NaN marks a
    cell a prompt does not have; the test then runs over the prompts that do
    (a cell no prompt has gets NaN).
    """
    batch = per_prompt.shape[0]
    diffs = per_prompt.detach().double().reshape(batch, -1)
    missing = diffs.isnan().all(0)
    diffs = diffs - baseline.detach().double().to(diffs.device)[:, None]
    diffs = diffs.nan_to_num(0.0)  # an absent prompt adds nothing to any signed sum
    signs, exact = _sign_patterns(batch, resamples, seed)
    signs = signs.to(diffs.device)
    observed = (torch.ones(1, batch, dtype=torch.float64, device=diffs.device) @ diffs).abs()[0]
    p = torch.empty(diffs.shape[1], dtype=torch.float64, device=diffs.device)
    for cells in _chunks(diffs.shape[1], signs.shape[0]):
        null = (signs @ diffs[:, cells]).abs()
        # the same sums in the same order: a tiny relative slack absorbs rounding only
        hits = (null >= observed[cells] * (1 - 1e-10)).sum(0).double()
        p[cells] = hits / signs.shape[0] if exact else (1 + hits) / (1 + signs.shape[0])
    p = torch.where(missing, torch.nan, p)
    return p.reshape(per_prompt.shape[1:])


def benjamini_hochberg(p_values: Float[Tensor, "..."], alpha: float = 0.05) -> Bool[Tensor, "..."]:
    """Cells significant at false discovery rate ``alpha`` (Benjamini–Hochberg); NaN never is."""
    flat = p_values.reshape(-1)
    finite = ~flat.isnan()
    p = flat[finite]
    significant = torch.zeros_like(flat, dtype=torch.bool)
    if p.numel():
        order = p.argsort()
        thresholds = alpha * torch.arange(1, p.numel() + 1, device=p.device) / p.numel()
        below = (p[order] <= thresholds).nonzero()
        if below.numel():
            chosen = torch.zeros_like(p, dtype=torch.bool)
            chosen[order[: int(below.max()) + 1]] = True
            significant[finite] = chosen
    return significant.reshape(p_values.shape)


BASELINES = ("clean", "corrupted")


def _recovery(
    values: Float[Tensor, "pair cell"],
    clean: Float[Tensor, " pair"],
    corrupted: Float[Tensor, " pair"],
) -> Float[Tensor, " cell"]:
    """``(mean patched - mean corrupted) / (mean clean - mean corrupted)`` over a cell's pairs."""
    have = ~values.isnan()
    count = have.sum(0)

    def mean(x: Tensor) -> Tensor:
        return torch.where(have, x, 0.0).sum(0) / count

    r = mean(corrupted[:, None].expand_as(values))
    gap = mean(clean[:, None].expand_as(values)) - r
    return torch.where(gap != 0, (mean(values) - r) / gap, torch.nan)


def cell_table(
    frame: pd.DataFrame, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per-cell summary of a per-pair patching table (``mitk patch``'s ``results.parquet``).

    ``frame`` has one row per pair and cell (columns ``pair``, ``site``, ``per``,
    ``layer``, ``head``, ``pos``, ``value``, ``clean``, ``corrupted``,
    ``direction``). Returns one row per ``(site, per, layer, head, pos)`` with
    ``value`` (mean over the pairs that have the cell), ``ci_low``/``ci_high``
    (bootstrap over pairs), ``normalized`` with ``normalized_ci_low``/``_high``
    (the recovery ``PatchResult.normalized`` gives: a ratio of means over the
    pairs that have the cell, NaN where the baselines' means coincide),
    ``p_value`` (sign flips against each pair's unpatched run; it is the
    recovery's p-value too) and ``pairs`` (how many pairs have the cell).
    """
    cell = ["layer", "head", "pos"]
    parts = []
    for (site, per), part in frame.groupby(["site", "per"], sort=False):
        keyed = part.assign(**{c: part[c].astype("Int64").fillna(-1) for c in ("head", "pos")})
        grid = keyed.pivot(index="pair", columns=cell, values="value")
        baselines = keyed.drop_duplicates("pair").set_index("pair").loc[grid.index]
        values = torch.tensor(grid.to_numpy(dtype=float), dtype=torch.float64)
        denoising = part["direction"].iloc[0] == "denoising"
        base = baselines["corrupted" if denoising else "clean"].to_numpy(dtype=float)
        low, high = bootstrap_interval(
            values, confidence=confidence, resamples=resamples, seed=seed
        )
        clean, corrupted = (torch.tensor(baselines[b].to_numpy(dtype=float)) for b in BASELINES)
        norm_low, norm_high = bootstrap_interval(
            values, clean, corrupted, confidence=confidence, resamples=resamples, seed=seed
        )
        p = sign_flip_test(values, torch.tensor(base), resamples=resamples, seed=seed)
        table = grid.columns.to_frame(index=False)
        for column in ("head", "pos"):
            table[column] = table[column].astype("Int64").replace(-1, pd.NA)
        table.insert(0, "per", per)
        table.insert(0, "site", site)
        table["value"] = values.nanmean(0).numpy()
        table["ci_low"], table["ci_high"], table["p_value"] = low.numpy(), high.numpy(), p.numpy()
        table["normalized"] = _recovery(values, clean, corrupted).numpy()
        table["normalized_ci_low"] = norm_low.numpy()
        table["normalized_ci_high"] = norm_high.numpy()
        table["pairs"] = (~values.isnan()).sum(0).numpy()
        parts.append(table)
    return pd.concat(parts, ignore_index=True)
