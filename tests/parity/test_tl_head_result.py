"""Per-head results: mitk's derived ``hook_result`` equals TransformerLens's use_attn_result."""

from __future__ import annotations

from pathlib import Path

import torch

from mitk import HookedTransformer
from tests.parity.test_transformer_lens import _tl_hooked_transformer, tl_deprecation


@tl_deprecation
def test_hook_result_matches_tl_use_attn_result(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    tl = _tl_hooked_transformer(gpt2_dir)
    tl.set_use_attn_result(True)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    names = [f"blocks.{layer}.attn.hook_result" for layer in range(gpt2.cfg.n_layers)]
    with torch.no_grad():
        _, theirs = tl.run_with_cache(tokens, names_filter=names)
        _, ours = gpt2.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0, msg=name)
