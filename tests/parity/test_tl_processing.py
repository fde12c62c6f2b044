"""mitk's weight processing against transformer-lens's on the same GPT-2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.model.processing import STEPS
from tests.parity.test_transformer_lens import (
    _compare,
    _shared_hooks,
    _tl_hooked_transformer,
    tl_deprecation,
)

TOL = 1e-4
WEIGHTS = ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
           "W_in", "b_in", "W_out", "b_out", "W_U", "b_U"]  # fmt: skip
CHOICES = [[step] for step in STEPS] + [list(STEPS)]
REFACTOR = "refactor_factored_attn_matrices"
# weights and hooks of the refactored factors, with the factor pair whose signs they follow
QK_SIDE = {"W_Q": -2, "W_K": -2, "b_Q": None, "b_K": None}
OV_SIDE = {"W_V": -2, "W_O": -1, "b_V": None}
# an SVD direction is defined up to sign; TransformerLens computes it in float32, where a
# direction moves by rounding / singular-value gap: compare refactored factors to this
REFACTOR_TOL = 1e-4


def _signs(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per [layer, head, d_head] column: +1 or -1 aligning our factor with theirs."""
    return torch.where((ours * theirs).sum(-2) < 0, -1.0, 1.0)


def _aligned(value: torch.Tensor, signs: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``value`` with its d_head axis (``dim``; None: the last) multiplied by ``signs``."""
    if dim == -1:  # W_O [layer, head, d_head, d_model]: d_head is the rows
        return value * signs[..., :, None]
    return value * (signs[..., None, :] if dim == -2 else signs)


@tl_deprecation
@pytest.mark.parametrize("steps", CHOICES, ids=["+".join(c) for c in CHOICES])
def test_processed_weights_hooks_and_logits_match_tl(gpt2_dir: Path, steps: list[str]) -> None:
    flags = {step: step in steps for step in STEPS}
    tl = _tl_hooked_transformer(gpt2_dir)
    tl.load_and_process_state_dict(tl.state_dict(), **flags)
    ours = HookedTransformer.from_pretrained(gpt2_dir, **flags)
    refactored = flags[REFACTOR]
    unsigned = torch.ones(ours.cfg.n_layers, ours.cfg.n_heads, ours.cfg.d_head)
    qk = _signs(ours.W_Q, tl.W_Q) if refactored else unsigned
    ov = _signs(ours.W_V, tl.W_V) if refactored else unsigned
    for attr in WEIGHTS:
        mine, tol = getattr(ours, attr), 1e-5
        if refactored and attr in QK_SIDE:
            mine, tol = _aligned(mine, qk, QK_SIDE[attr]), REFACTOR_TOL
        elif refactored and attr in OV_SIDE:
            mine, tol = _aligned(mine, ov, OV_SIDE[attr]), REFACTOR_TOL
        torch.testing.assert_close(mine, getattr(tl, attr), atol=tol, rtol=0,
                                   msg=lambda m, a=attr: f"{a}: {m}")  # fmt: skip
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(7))
    names = _shared_hooks(ours.cfg.n_layers)
    with torch.no_grad():
        their_logits, theirs = tl.run_with_cache(tokens)
        logits, cache = ours.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, their_logits, atol=TOL, rtol=0)
    acts = dict(cache.items())
    for layer in range(ours.cfg.n_layers):  # q/k/v/z follow their factors' signs
        for hook, signs in [("q", qk), ("k", qk), ("v", ov), ("z", ov)]:
            key = f"blocks.{layer}.attn.hook_{hook}"
            acts[key] = acts[key] * signs[layer]
    _compare(acts, theirs, names, tokens.shape[0])


@tl_deprecation
def test_refactor_balances_each_head_as_tl_describes(gpt2_dir: Path) -> None:
    """W_O has orthonormal rows, W_V's columns carry the OV singular values, and W_Q and W_K
    columns (with their bias row) share each QK singular value evenly."""
    model = HookedTransformer.from_pretrained(gpt2_dir).process_weights_(
        refactor_factored_attn_matrices=True
    )
    w_o = model.W_O.double()
    eye = torch.eye(w_o.shape[-2], dtype=torch.float64).expand_as(w_o @ w_o.mT)
    torch.testing.assert_close(w_o @ w_o.mT, eye, atol=1e-5, rtol=0)
    ov_values = torch.linalg.svdvals((model.W_V @ model.W_O).double())[..., : w_o.shape[-2]]
    torch.testing.assert_close(model.W_V.double().norm(dim=-2), ov_values, atol=1e-6, rtol=1e-4)
    q_eff = torch.cat([model.W_Q, model.b_Q[:, :, None]], dim=-2).double()
    k_eff = torch.cat([model.W_K, model.b_K[:, :, None]], dim=-2).double()
    torch.testing.assert_close(q_eff.norm(dim=-2), k_eff.norm(dim=-2), atol=1e-6, rtol=1e-4)
    gram = q_eff.mT @ q_eff  # orthogonal columns
    off_diagonal = gram - torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() < 1e-6
    assert model.cfg.extra["processing"] == [*STEPS]
