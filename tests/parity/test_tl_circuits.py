"""Circuits, FactoredMatrix and composition scores against transformer-lens on the same GPT-2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.circuits import full_ov_circuit, ov_copying_scores
from mitk.analysis.composition import composition_scores
from mitk.model.factored_matrix import FactoredMatrix
from tests.parity.test_transformer_lens import _tl_hooked_transformer, tl_deprecation

pytestmark = tl_deprecation


@pytest.fixture(scope="module")
def tl(gpt2_dir: Path) -> Any:
    return _tl_hooked_transformer(gpt2_dir)


def _same_multiset(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    """Eigenvalues agree as sets per leading index (eig returns them in no fixed order)."""
    ours, theirs = ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])
    dist = (ours[:, :, None] - theirs[:, None, :]).abs()
    assert dist.min(2).values.max() < tol and dist.min(1).values.max() < tol


def test_qk_and_ov_match(gpt2: HookedTransformer, tl: Any) -> None:
    for ours, theirs in [(gpt2.QK, tl.QK), (gpt2.OV, tl.OV)]:
        assert ours.shape == theirs.shape and ours.mdim == theirs.mdim
        assert (ours.ldim, ours.rdim) == (theirs.ldim, theirs.rdim)
        torch.testing.assert_close(ours.AB, theirs.AB, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.BA, theirs.BA, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.norm(), theirs.norm(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.svd()[1], theirs.S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1, 2].AB, theirs[1, 2].AB, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.T.AB, theirs.T.AB, atol=1e-6, rtol=0)
        _same_multiset(ours.eigenvalues, theirs.eigenvalues, tol=1e-5)


def test_full_ov_circuit_and_its_eigenvalues_match(gpt2: HookedTransformer, tl: Any) -> None:
    theirs = tl.W_E @ tl.OV @ tl.W_U  # the expression transformer-lens's tutorials use
    ours = full_ov_circuit(gpt2)
    torch.testing.assert_close(ours.AB, theirs.AB, atol=1e-5, rtol=0)
    _same_multiset(ours.eigenvalues, theirs.eigenvalues, tol=1e-4)
    eig = theirs.eigenvalues
    torch.testing.assert_close(
        ov_copying_scores(gpt2), (eig.sum(-1) / eig.abs().sum(-1)).real, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores_match(gpt2: HookedTransformer, tl: Any, kind: str) -> None:
    ours = composition_scores(gpt2, kind)
    theirs = tl.all_composition_scores(kind)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=0)


def test_factored_matrix_matches_transformer_lens_on_the_same_factors() -> None:
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, 9, 4, generator=gen), torch.randn(2, 3, 4, 7, generator=gen)
    M, N = torch.randn(7, 5, generator=gen), torch.randn(6, 9, generator=gen)
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    assert ours.shape == theirs.shape and ours.ndim == theirs.ndim
    assert (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)
    assert ours.has_leading_dims == theirs.has_leading_dims
    assert all(a is b for a, b in zip(ours.pair, ours.pair, strict=True))
    assert [t.shape for t in ours.pair] == [t.shape for t in theirs.pair]
    pairs = [
        (ours @ M, theirs @ M),
        (N @ ours, N @ theirs),
        (ours.T @ ours, theirs.T @ theirs),
        (ours[1], theirs[1]),
        (ours[1, 2, 3], theirs[1, 2, 3]),
        (ours[[1, 0]], theirs[[1, 0]]),
        (ours[:, torch.tensor([2, 0])], theirs[:, torch.tensor([2, 0])]),
        (ours[0, 1, [0, 3], -1], theirs[0, 1, [0, 3], -1]),
        (ours.unsqueeze(1), theirs.unsqueeze(1)),
        (ours.make_even(), theirs.make_even()),
        (ours * 2.5, theirs * 2.5),
    ]
    for mine, tls in pairs:
        assert mine.shape == tls.shape and mine.mdim == tls.mdim
        torch.testing.assert_close(mine.AB, tls.AB, atol=1e-5, rtol=1e-5)
    # a vector on either side gives a plain tensor in both
    v, w = torch.randn(7, generator=gen), torch.randn(9, generator=gen)
    torch.testing.assert_close(ours @ v, theirs @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w @ ours, w @ theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(), theirs.norm(), atol=1e-5, rtol=1e-5)
    U, S, V = ours.svd()
    torch.testing.assert_close(S, theirs.S, atol=1e-5, rtol=1e-5)
    # both follow torch.svd: the third factor is V (and .Vh holds it too), AB = U diag(S) Vᵀ
    their_u, _, their_v = theirs.svd()
    assert their_v.shape == V.shape and theirs.V.shape == ours.V.shape
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, theirs.AB, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        their_u @ torch.diag_embed(S) @ their_v.mT, theirs.AB, atol=1e-5, rtol=1e-5
    )
    # their corner also cuts the leading dims to k; ours keeps them
    torch.testing.assert_close(ours.get_corner(2)[:2, :2], theirs.get_corner(2), atol=1e-5, rtol=0)
