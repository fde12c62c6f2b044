"""FactoredMatrix: every operation against the materialised product it stands for."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import torch

from mitk.errors import MitkError, ShapeMismatchError
from mitk.model.factored_matrix import BroadcastMismatchError, FactoredMatrix

TOL = {"atol": 1e-9, "rtol": 1e-7}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def factored(batch: tuple[int, ...], m: int, r: int, n: int, seed: int = 0) -> FactoredMatrix:
    return FactoredMatrix(randn(*batch, m, r, seed=seed), randn(*batch, r, n, seed=seed + 1))


def assert_eigenvalues_match(ours: torch.Tensor, full: torch.Tensor, tol: float = 1e-6) -> None:
    """Our mdim eigenvalues are the full matrix's largest ones; the rest of the full are zero."""
    ours, full = ours.reshape(-1, ours.shape[-1]), full.reshape(-1, full.shape[-1])
    for mine, theirs in zip(ours, full, strict=True):
        k = mine.shape[0]
        top = theirs[theirs.abs().argsort(descending=True)[:k]]
        dist = (mine[:, None] - top[None, :]).abs()
        assert dist.min(1).values.max() < tol and dist.min(0).values.max() < tol
        rest = theirs[theirs.abs().argsort(descending=True)[k:]]
        assert rest.abs().max() < tol if rest.numel() else True


# --- shape and basic products ------------------------------------------------------------
def test_shape_attributes_follow_transformer_lens_names() -> None:
    fm = factored((2, 3), m=5, r=4, n=6)
    assert fm.shape == torch.Size((2, 3, 5, 6))
    assert (fm.ldim, fm.mdim, fm.rdim, fm.ndim) == (5, 4, 6, 4)
    assert "FactoredMatrix" in repr(fm)
    assert fm.has_leading_dims and not factored((), m=5, r=4, n=6).has_leading_dims
    A, B = fm.pair
    assert A is fm.A and B is fm.B


def test_shape_errors_are_assertion_errors_as_in_transformer_lens() -> None:
    """TransformerLens asserts shapes; code catching AssertionError keeps working, messages kept."""
    assert issubclass(ShapeMismatchError, MitkError | ValueError)
    assert issubclass(ShapeMismatchError, AssertionError)
    with pytest.raises(AssertionError, match="square"):
        _ = factored((), m=5, r=2, n=4).BA
    # leading dims that do not broadcast: what torch (and TransformerLens) raise, a RuntimeError
    with pytest.raises(RuntimeError, match="mismatch"):
        FactoredMatrix(randn(9, 5, 3), randn(2, 4, 3, 7))
    assert issubclass(BroadcastMismatchError, ShapeMismatchError)


def test_ab_ba_and_transpose() -> None:
    fm = factored((3,), m=6, r=2, n=6)
    torch.testing.assert_close(fm.AB, fm.A @ fm.B, **TOL)
    torch.testing.assert_close(fm.BA, fm.B @ fm.A, **TOL)
    assert fm.BA.shape == (3, 2, 2)
    torch.testing.assert_close(fm.T.AB, fm.AB.mT, **TOL)
    torch.testing.assert_close(fm.T.T.AB, fm.AB, **TOL)


def test_leading_dims_broadcast_without_copies() -> None:
    A, B = randn(3, 1, 5, 2), randn(4, 2, 7, seed=1)
    fm = FactoredMatrix(A, B)
    assert fm.shape == (3, 4, 5, 7)
    torch.testing.assert_close(fm.AB, A @ B, **TOL)
    assert fm.A.data_ptr() == A.data_ptr()


def test_bad_factors_raise_shape_errors() -> None:
    with pytest.raises(ShapeMismatchError, match="do not chain"):
        FactoredMatrix(randn(5, 3), randn(4, 5))
    with pytest.raises(ShapeMismatchError, match="broadcast"):
        FactoredMatrix(randn(2, 5, 3), randn(3, 3, 5))
    with pytest.raises(ShapeMismatchError, match="square"):
        _ = factored((), m=5, r=2, n=4).BA
    with pytest.raises(ShapeMismatchError, match="square"):
        _ = factored((), m=5, r=2, n=4).eigenvalues


# --- matmul ------------------------------------------------------------------------------
@pytest.mark.parametrize(("r", "n"), [(2, 6), (6, 3)])  # keeps A @ (B M), or materialises AB
def test_matmul_with_a_plain_matrix_on_the_right(r: int, n: int) -> None:
    fm, M = factored((2,), m=5, r=r, n=n), randn(n, 4, seed=5)
    out = fm @ M
    assert isinstance(out, FactoredMatrix)
    assert out.mdim == min(r, n)
    torch.testing.assert_close(out.AB, fm.AB @ M, **TOL)


@pytest.mark.parametrize(("m", "r"), [(6, 2), (3, 6)])
def test_matmul_with_a_plain_matrix_on_the_left(m: int, r: int) -> None:
    fm, M = factored((2,), m=m, r=r, n=5), randn(2, 4, m, seed=5)
    out = M @ fm
    assert isinstance(out, FactoredMatrix)
    assert out.mdim == min(m, r)
    torch.testing.assert_close(out.AB, M @ fm.AB, **TOL)


@pytest.mark.parametrize(("r1", "n", "r2"), [(2, 6, 3), (4, 6, 2), (5, 2, 4), (3, 6, 3)])
def test_matmul_of_two_factored_matrices_stays_factored_through_narrowest_dim(
    r1: int, n: int, r2: int
) -> None:
    left, right = factored((3,), m=5, r=r1, n=n), factored((3,), m=n, r=r2, n=7, seed=4)
    out = left @ right
    assert isinstance(out, FactoredMatrix)
    assert out.mdim == min(r1, n, r2)
    torch.testing.assert_close(out.AB, left.AB @ right.AB, **TOL)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_matmul_with_a_vector_gives_a_tensor_on_either_side(batch: tuple[int, ...]) -> None:
    fm = factored(batch, m=5, r=2, n=4)
    v, w = randn(4, seed=7), randn(5, seed=8)
    out = fm @ v
    assert isinstance(out, torch.Tensor) and out.shape == (*batch, 5)
    torch.testing.assert_close(out, fm.AB @ v, **TOL)
    left = w @ fm
    assert isinstance(left, torch.Tensor) and left.shape == (*batch, 4)
    torch.testing.assert_close(left, w @ fm.AB, **TOL)


def test_matmul_refuses_scalars_mismatched_and_unbroadcastable_dims() -> None:
    fm = factored((), m=5, r=2, n=4)
    with pytest.raises(ShapeMismatchError, match="use \\*"):
        fm @ torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(ShapeMismatchError, match="inner dims"):
        fm @ randn(5)
    with pytest.raises(ShapeMismatchError, match="inner dims"):
        randn(4) @ fm
    with pytest.raises(ShapeMismatchError, match="inner dims"):
        fm @ randn(5, 3)
    with pytest.raises(ShapeMismatchError, match="inner dims"):
        randn(3, 4) @ fm
    with pytest.raises(ShapeMismatchError, match="inner dims"):
        fm @ factored((), m=3, r=2, n=3)
    batched = factored((2,), m=5, r=2, n=4)
    with pytest.raises(BroadcastMismatchError, match="do not broadcast"):
        batched @ factored((3,), m=4, r=2, n=3)
    with pytest.raises(BroadcastMismatchError, match="do not broadcast"):
        batched @ randn(3, 4, 2)
    with pytest.raises(TypeError):  # not a tensor: NotImplemented from both sides
        fm @ "matrix"  # type: ignore[operator]


def test_scalar_multiplication_on_either_side() -> None:
    fm = factored((2,), m=4, r=2, n=3)
    torch.testing.assert_close((fm * 2.5).AB, 2.5 * fm.AB, **TOL)
    torch.testing.assert_close((3 * fm).AB, 3 * fm.AB, **TOL)
    torch.testing.assert_close((fm * torch.tensor(-1.0, dtype=torch.float64)).AB, -fm.AB, **TOL)
    with pytest.raises(ShapeMismatchError, match="use @"):
        fm * randn(3)


# --- svd, norm, eigenvalues --------------------------------------------------------------
@pytest.mark.parametrize(("m", "r", "n"), [(7, 3, 6), (2, 5, 6), (6, 5, 2), (4, 4, 4)])
def test_svd_reconstructs_and_matches_singular_values(m: int, r: int, n: int) -> None:
    fm = factored((2, 3), m=m, r=r, n=n)
    U, S, V = fm.svd()  # TransformerLens's convention: AB = U diag(S) Vᵀ
    k = min(m, r, n)
    assert U.shape == (2, 3, m, k) and S.shape == (2, 3, k) and V.shape == (2, 3, n, k)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, fm.AB, **TOL)
    assert fm.U.shape == U.shape and torch.equal(fm.S, S) and torch.equal(fm.V, V)
    with pytest.warns(DeprecationWarning, match="use .V"):  # TransformerLens deprecates it too
        assert torch.equal(fm.Vh, V)
    torch.testing.assert_close(S, torch.linalg.svdvals(fm.AB)[..., :k], **TOL)
    eye = torch.eye(k, dtype=torch.float64).expand(2, 3, k, k)
    torch.testing.assert_close(U.mT @ U, eye, **TOL)
    torch.testing.assert_close(V.mT @ V, eye, **TOL)


def test_collapses_keep_the_gram_matrices() -> None:
    fm = factored((2,), m=6, r=3, n=5)
    left, right = fm.collapse_l(), fm.collapse_r()
    assert left.shape == (2, 3, 5) and right.shape == (2, 6, 3)
    torch.testing.assert_close(left.mT @ left, fm.AB.mT @ fm.AB, **TOL)
    torch.testing.assert_close(right @ right.mT, fm.AB @ fm.AB.mT, **TOL)


def test_svd_is_computed_once_and_again_when_a_factor_is_replaced() -> None:
    fm = factored((2,), m=6, r=3, n=5)
    first = fm.svd()
    assert all(a is b for a, b in zip(first, fm.svd(), strict=True))
    fm.A = fm.A * 2
    _, S, _ = fm.svd()
    torch.testing.assert_close(S, 2 * first[1], **TOL)


def test_make_even_splits_each_singular_value_between_the_factors() -> None:
    fm = factored((2,), m=6, r=3, n=5)
    even = fm.make_even()
    torch.testing.assert_close(even.AB, fm.AB, **TOL)
    root = torch.diag_embed(fm.S.sqrt())
    torch.testing.assert_close(even.A.mT @ even.A, root @ root, **TOL)
    torch.testing.assert_close(even.B @ even.B.mT, root @ root, **TOL)


def test_norm_is_frobenius_of_the_product() -> None:
    fm = factored((2, 3), m=8, r=3, n=5)
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(fm.AB), **TOL)
    wide = factored((), m=2, r=6, n=3)  # more inner dims than rows
    torch.testing.assert_close(wide.norm(), torch.linalg.matrix_norm(wide.AB), **TOL)


def test_eigenvalues_are_the_nonzero_eigenvalues_of_ab() -> None:
    fm = factored((2, 3), m=7, r=3, n=7)
    eig = fm.eigenvalues
    assert eig.shape == (2, 3, 3) and eig.is_complex()
    assert_eigenvalues_match(eig, torch.linalg.eigvals(fm.AB))


def test_half_precision_linear_algebra_runs_in_float32() -> None:
    fm = FactoredMatrix(randn(6, 2).half(), randn(2, 6, seed=1).half())
    exact = FactoredMatrix(fm.A.double(), fm.B.double())
    assert fm.norm().dtype == torch.float32 and fm.svd()[1].dtype == torch.float32
    assert fm.eigenvalues.dtype == torch.complex64
    torch.testing.assert_close(fm.norm().double(), exact.norm(), atol=1e-4, rtol=1e-4)


def test_half_precision_eigenvalues_are_nearer_exact_than_a_16_bit_product() -> None:
    """Factors upcast before BA is formed (TransformerLens forms BA in bfloat16, then upcasts)."""
    for seed in range(20):
        A, B = randn(10, 4, seed=seed).bfloat16(), randn(4, 10, seed=seed + 100).bfloat16()
        exact = torch.linalg.eigvals(B.double() @ A.double())
        ours = FactoredMatrix(A, B).eigenvalues.to(torch.complex128)
        product_first = torch.linalg.eigvals((B @ A).float()).to(torch.complex128)

        def error(eig: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return float((eig[:, None] - exact[None]).abs().min(1).values.max())

        assert error(ours) <= error(product_first)


# --- indexing and corners ----------------------------------------------------------------
def test_indexing_leading_dims() -> None:
    fm = factored((3, 4), m=5, r=2, n=6)
    torch.testing.assert_close(fm[1].AB, fm.AB[1], **TOL)
    torch.testing.assert_close(fm[1, 2].AB, fm.AB[1, 2], **TOL)
    torch.testing.assert_close(fm[:, 2].AB, fm.AB[:, 2], **TOL)
    torch.testing.assert_close(fm[-1, 1:3].AB, fm.AB[-1, 1:3], **TOL)
    picked = torch.tensor([0, 2])
    torch.testing.assert_close(fm[picked].AB, fm.AB[picked], **TOL)
    assert fm[1, 2].shape == (5, 6)


def test_indexing_rows_and_columns_keeps_a_matrix() -> None:
    fm = factored((3,), m=5, r=2, n=6)
    torch.testing.assert_close(fm[1, 2].AB, fm.AB[1, 2:3], **TOL)
    torch.testing.assert_close(fm[1, -1].AB, fm.AB[1, -1:], **TOL)
    torch.testing.assert_close(fm[1, 1:4, 2:5].AB, fm.AB[1, 1:4, 2:5], **TOL)
    torch.testing.assert_close(fm[0, :, -1].AB, fm.AB[0, :, -1:], **TOL)


@pytest.mark.parametrize(
    "index",
    [
        [0, 2],  # a list of leading indices
        (torch.tensor([2, 0]), 1),
        torch.tensor([True, False, True]),  # a mask
        (None, 1),  # a new leading dim
        (..., 1, 2),  # ... stands for the leading dims: row 1, column 2
        (1, ..., slice(1, 3)),  # columns 1:3
        (np.int64(1), torch.tensor(2), slice(0, 2)),
        (torch.tensor([[0, 1], [2, 0]]), slice(None), -1),  # a 2-D index on a leading dim
    ],
    ids=str,
)
def test_indexing_matches_the_dense_product(index: object) -> None:
    fm = factored((3, 4), m=5, r=2, n=6)
    # ints on the matrix's dims keep a length-1 dim (the result stays a matrix)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        dense_index = [*items[:-2], *(_keep(i) for i in items[-2:])]
    else:
        lead = sum(0 if i is None else 1 for i in items)
        dense_index = [*items, *([slice(None)] * (4 - lead))]
        dense_index[-2:] = [_keep(i) for i in dense_index[-2:]]
    out = fm[index]
    assert isinstance(out, FactoredMatrix) and out.mdim == fm.mdim
    torch.testing.assert_close(out.AB, fm.AB[tuple(dense_index)], **TOL)


def _keep(i: object) -> object:
    return slice(i, i + 1 if i != -1 else None) if isinstance(i, int) else i


def test_index_rows_and_columns_by_lists_never_pair_with_leading_indices() -> None:
    fm = factored((3,), m=5, r=2, n=6)
    out = fm[[2, 0], [1, 3], [0, 5, 4]]
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out.AB, fm.AB[[2, 0]][:, [1, 3]][:, :, [0, 5, 4]], **TOL)


def test_bad_indices_raise() -> None:
    fm = factored((3,), m=5, r=2, n=6)
    with pytest.raises(ShapeMismatchError, match="too long an index"):
        fm[0, 1, 2, 3]
    with pytest.raises(IndexError, match="single ellipsis"):
        fm[..., 0, ...]
    with pytest.raises(ShapeMismatchError, match="None adds leading dims only"):
        fm[0, 1, None, 2]
    with pytest.raises(ShapeMismatchError, match="span"):
        fm[torch.ones(3, 5, dtype=torch.bool)]
    with pytest.raises(ShapeMismatchError, match="1-D"):
        fm[0, torch.tensor([[1, 2]])]
    with pytest.raises(ShapeMismatchError, match="bool"):
        fm[True]
    with pytest.raises(ShapeMismatchError, match="cannot index"):
        fm["0"]


def test_unsqueeze_adds_leading_dims_only() -> None:
    fm = factored((3,), m=5, r=2, n=6)
    assert fm.unsqueeze(0).shape == (1, 3, 5, 6) and fm.unsqueeze(1).shape == (3, 1, 5, 6)
    assert fm.unsqueeze(-3).shape == (3, 1, 5, 6)
    torch.testing.assert_close(fm.unsqueeze(0).AB, fm.AB.unsqueeze(0), **TOL)
    with pytest.raises(ShapeMismatchError, match="before the last two"):
        fm.unsqueeze(2)
    with pytest.raises(ShapeMismatchError, match="before the last two"):
        fm.unsqueeze(-1)


def test_get_corner_is_the_top_left_block() -> None:
    fm = factored((2, 3), m=6, r=2, n=5)
    torch.testing.assert_close(fm.get_corner(), fm.AB[..., :3, :3], **TOL)
    torch.testing.assert_close(fm.get_corner(4), fm.AB[..., :4, :4], **TOL)
    assert fm.get_corner(10).shape == (2, 3, 6, 5)


# --- properties on random shapes ---------------------------------------------------------
dims = st.integers(min_value=1, max_value=6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    m=dims,
    r=dims,
    n=dims,
    p=dims,
    seed=st.integers(0, 2**16),
)
def test_products_norm_and_svd_match_the_materialised_matrix(
    batch: tuple[int, ...], m: int, r: int, n: int, p: int, seed: int
) -> None:
    fm = factored(batch, m, r, n, seed=seed)
    M, N = randn(n, p, seed=seed + 2), randn(p, m, seed=seed + 3)
    other = factored(batch, n, p, m, seed=seed + 4)
    torch.testing.assert_close((fm @ M).AB, fm.AB @ M, **TOL)
    torch.testing.assert_close((N @ fm).AB, N @ fm.AB, **TOL)
    torch.testing.assert_close((fm @ other).AB, fm.AB @ other.AB, **TOL)
    torch.testing.assert_close(fm.T.AB, fm.AB.mT, **TOL)
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(fm.AB), **TOL)
    U, S, V = fm.svd()
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, fm.AB, **TOL)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 8), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_eigenvalues_match_eigvals_of_the_product(m: int, r: int, seed: int) -> None:
    fm = factored((2,), m, min(r, m), m, seed=seed)
    assert_eigenvalues_match(fm.eigenvalues, torch.linalg.eigvals(fm.AB), tol=1e-5)
