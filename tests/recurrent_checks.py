"""Checks every recurrent layer kind must pass: a constant-size state carried between calls."""

from __future__ import annotations

import torch

from mitk import HookedTransformer
from mitk.model.kv_cache import KVCache


def state_shapes_after_incremental_run(
    model: HookedTransformer, tokens: torch.Tensor, state_type: type, prefix: int = 9
) -> list[tuple[tuple[int, ...], ...]]:
    """Run ``tokens`` as a prefix then one token at a time; assert it equals one full run.

    Also asserts that every layer's cache entry is a ``state_type`` whose shapes never
    grow; returns the per-layer shapes for the caller's own checks.
    """
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :prefix], past_kv_cache=cache)]
        shapes = [tuple(tuple(t.shape) for t in layer) for layer in cache.layers if layer]
        for t in range(prefix, tokens.shape[1]):
            parts.append(model(tokens[:, t : t + 1], past_kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.length == tokens.shape[1]
    assert all(isinstance(layer, state_type) for layer in cache.layers)
    assert [tuple(tuple(t.shape) for t in layer) for layer in cache.layers if layer] == shapes
    return shapes


def assert_generation_runs_the_prefix_once(model: HookedTransformer, tokens: torch.Tensor) -> None:
    """Cached greedy generation feeds the prompt once, then one token a step, and equals a rerun."""
    seen: list[int] = []
    hooks = [("hook_embed", lambda act, hook: seen.append(act.shape[1]))]
    cached = model.generate(
        tokens, 8, do_sample=False, stop_at_eos=False, verbose=False, fwd_hooks=hooks
    )
    assert seen == [tokens.shape[1]] + [1] * 7
    rerun = model.generate(
        tokens, 8, do_sample=False, stop_at_eos=False, verbose=False, use_past_kv_cache=False
    )
    assert torch.equal(cached, rerun)
