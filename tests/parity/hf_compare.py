"""Shared Hugging Face parity checks for decoder-only families: a batch and one comparison."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mitk import HookedTransformer


def token_batch(vocab: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Three rows of 12 tokens; ``padded`` left-pads two of them (5 and 1 positions)."""
    tokens = torch.randint(1, vocab, (3, 12), generator=torch.Generator().manual_seed(2))
    if not padded:
        return tokens, None
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    mask[2, :1] = 0
    return tokens, mask


def hf_forward(hf: Any, tokens: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """HF's output with every hidden state; position ids count real tokens, as mitk's do."""
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return hf(tokens, output_hidden_states=True, **kwargs)


class Match(NamedTuple):
    real: torch.Tensor  # [batch, pos] True at real tokens
    hf_out: Any
    logits: torch.Tensor  # mitk's


def assert_matches_hf(
    hf: Any, model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor | None, tol: float
) -> Match:
    """Log-probs and the stream entering every block equal HF's at real tokens."""
    hf_out = hf_forward(hf, tokens, mask)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_resid_pre")
        )
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(
        logits.log_softmax(-1)[real], hf_out.logits.log_softmax(-1)[real], atol=tol, rtol=0
    )
    # HF's hidden_states[L] is the stream entering block L
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache["resid_pre", layer][real], hf_out.hidden_states[layer][real], atol=tol, rtol=0
        )
    return Match(real, hf_out, logits)
