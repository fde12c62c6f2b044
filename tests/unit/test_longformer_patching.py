"""Activation patching on a Longformer with global tokens: batched, equal to a naive loop.

A native pre-norm Longformer (it has logits) with global tokens that differ per prompt;
every cell of every site, the global projections' included, is patched by the engine and
by one plain forward per cell, and the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.patching.activation import activation_patch
from mitk.analysis.patching.metrics import logit_diff
from mitk.analysis.patching.sites import SITES
from tests.unit.test_longformer_config import _pre_norm_model

ANSWERS, WRONG = torch.tensor([1, 3]), torch.tensor([2, 4])


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (2, 11), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % 20
    mask = torch.ones_like(clean)
    mask[1, 9:] = 0  # right padding
    glob = torch.zeros_like(clean)
    glob[0, [0, 6]] = 1
    glob[1, [4, 10]] = 1  # 10 is padding: not global
    return clean, corrupted, mask, glob


def _naive(
    model: HookedTransformer, site: str, layer: int, index: tuple[object, ...]
) -> torch.Tensor:
    """The metric with one cell of ``site`` taken from the clean run, by a plain forward."""
    clean, corrupted, mask, glob = _inputs()
    hook = SITES[site].hook(layer)
    _, cache = model.run_with_cache(clean, attention_mask=mask, global_attention_mask=glob,
                                    names_filter=hook)  # fmt: skip

    def patch(act: torch.Tensor, hook: object) -> torch.Tensor:
        act = act.clone()
        act[index] = cache[SITES[site].hook(layer)][index]
        return act

    with model.hooks(fwd_hooks=[(hook, patch)]):
        logits = model(corrupted, attention_mask=mask, global_attention_mask=glob)[:, -1]
    rows = torch.arange(2)
    return logits[rows, ANSWERS] - logits[rows, WRONG]


def _cell(site: str, head: int | None, pos: int | None) -> tuple[object, ...]:
    where = SITES[site]
    index: list[object] = [slice(None)] * (4 if where.head_axis is not None else 3)
    if pos is not None:
        index[where.pos_axis] = pos
    if head is not None and where.head_axis is not None:
        index[where.head_axis] = head
    return tuple(index)


CASES: list[tuple[str, str]] = [("q_global", "head_pos"), ("k_global", "head"),
                                ("v_global", "head_pos"), ("z", "head_pos"),
                                ("pattern", "head"), ("resid_pre", "pos")]  # fmt: skip


@pytest.mark.parametrize(("site", "per"), CASES)
def test_engine_equals_one_forward_per_cell(site: str, per: str) -> None:
    model = _pre_norm_model()
    clean, corrupted, mask, glob = _inputs()
    with torch.no_grad():
        result = activation_patch(model, clean, corrupted, logit_diff(ANSWERS, WRONG, pos=-1),
                                  site=site, per=per,  # type: ignore[arg-type]
                                  attention_mask=mask, global_attention_mask=glob)  # fmt: skip
        heads = range(2) if "head" in per else [None]
        positions = range(11) if "pos" in per else [None]
        worst = 0.0
        for layer in range(2):
            for head in heads:
                for pos in positions:
                    got = result.per_prompt[:, layer]
                    got = got[:, head] if head is not None else got
                    got = got[:, pos] if pos is not None else got
                    expected = _naive(model, site, layer, _cell(site, head, pos))
                    worst = max(worst, float((got - expected).abs().max()))
    assert worst < 1e-5


def test_global_tokens_matter_to_the_patched_runs() -> None:
    """Without the global mask the metric differs: the engine really runs the global rows."""
    model = _pre_norm_model()
    clean, corrupted, mask, glob = _inputs()
    metric: Callable[..., object] = logit_diff(ANSWERS, WRONG, pos=-1)
    with torch.no_grad():
        with_glob = activation_patch(model, clean, corrupted, metric, site="z", per="head",
                                     attention_mask=mask, global_attention_mask=glob)  # fmt: skip
        without = activation_patch(model, clean, corrupted, metric, site="z", per="head",
                                   attention_mask=mask)  # fmt: skip
    assert (with_glob.per_prompt - without.per_prompt).abs().max() > 1e-4
