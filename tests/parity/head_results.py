"""One check for attention kinds with their own fast path: per-head writes still add up."""

from __future__ import annotations

import torch

from mitk import HookedTransformer


def assert_head_results_sum_to_attn_out(
    model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, path: str
) -> None:
    """On the fast path ``path`` (no pattern built), ``hook_result`` over heads + ``b_O`` is
    ``hook_attn_out`` at every layer, within 1e-5."""
    wanted = ("attn.hook_result", "hook_attn_out")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens,
            attention_mask=mask,
            return_type="hidden",
            names_filter=lambda n: n.endswith(wanted),
        )
    assert model.attention_paths() == [path] * model.cfg.n_layers
    for layer, block in enumerate(model.blocks):
        heads = cache[f"blocks.{layer}.attn.hook_result"].sum(2) + block.attn.b_O
        assert (heads - cache[f"blocks.{layer}.hook_attn_out"]).abs().max() < 1e-5
