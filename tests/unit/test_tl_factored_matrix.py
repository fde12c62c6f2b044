"""TransformerLens's FactoredMatrix unit tests, ported to run against mitk's FactoredMatrix.

Ported from transformer-lens's ``tests/unit/factored_matrix/`` (test_constructor,
test_get_item, test_multiply_by_factored_matrix, test_multiply_by_matrix,
test_multiply_by_scalar, test_multiply_by_tensor_like, test_multiply_by_vector,
test_matmul_tensor, test_properties); ``test_matmul_factored_matrix.py`` is a
copy of test_multiply_by_factored_matrix and is not ported twice. Only the
imports, the random generator (seeded here) and these marks changed; every
assertion is kept as written:

- two tests TransformerLens skips for reasons of its own run here: the inner-dim
  mismatch (skipped there because jaxtyping intercepts it first; mitk's
  annotations name the two widths apart so the check is reached) and the
  ``vector @ matrix`` tests (skipped there for a bug since fixed);
- ``test_matmul_by_vector`` is skipped: it asks ``torch.equal`` of
  ``A @ (B @ v)`` and ``(A @ B) @ v``, which transformer-lens itself fails on
  most random draws (rounding), and test_multiply_by_vector covers the same;
- the bfloat16 eigenvalue test is xfailed: mitk multiplies 16-bit factors in
  float32, which lands nearer the exact eigenvalues than the test's reference;
- ``FactoredMatrix @ tensor-like`` and back are xfailed: mitk's ``@`` takes torch
  tensors and answers ``NotImplemented`` otherwise (the tensor-like vector test
  passes anyway, because the tensor-like's own ``__rmatmul__`` then does the work).
"""

from __future__ import annotations

from types import SimpleNamespace

from einops import repeat
import pytest
import torch
from torch.testing import assert_close

from mitk.model.factored_matrix import FactoredMatrix

_GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN)


def _get_corner(tensor: torch.Tensor, n: int = 3) -> torch.Tensor:
    """transformer_lens.utils.get_corner: the first n entries along every dim."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


# stands in for ``transformer_lens.utils`` in test_properties (two tensor helpers)
utils = SimpleNamespace(get_corner=_get_corner, transpose=lambda t: t.transpose(-2, -1))


# --- test_constructor.py ---------------------------------------------------------------------
def test_factored_matrix():
    A = torch.randn(5, 3)
    B = torch.randn(3, 7)
    f = FactoredMatrix(A, B)

    assert torch.equal(f.A, A)
    assert torch.equal(f.B, B)

    assert (f.ldim, f.mdim, f.rdim) == (5, 3, 7)
    assert not f.has_leading_dims
    assert f.shape == (5, 7)


def test_factored_matrix_b_leading_dims():
    A = torch.ones((5, 3))
    B = torch.ones((2, 4, 3, 7))
    f = FactoredMatrix(A, B)

    assert f.A.shape == (2, 4, 5, 3)
    assert torch.equal(f.B, B)

    assert (f.ldim, f.mdim, f.rdim) == (5, 3, 7)
    assert f.has_leading_dims
    assert f.shape == (2, 4, 5, 7)


def test_factored_matrix_a_b_leading_dims():
    A = torch.ones((4, 5, 3))
    B = torch.ones((2, 4, 3, 7))
    f = FactoredMatrix(A, B)

    assert f.A.shape == (2, 4, 5, 3)
    assert torch.equal(f.B, B)

    assert (f.ldim, f.mdim, f.rdim) == (5, 3, 7)
    assert f.has_leading_dims
    assert f.shape == (2, 4, 5, 7)


def test_factored_matrix_broadcast_mismatch():
    A = torch.ones((9, 5, 3))
    B = torch.ones((2, 4, 3, 7))

    with pytest.raises(RuntimeError, match=r"[Mm]ismatch"):
        FactoredMatrix(A, B)


def test_factored_matrix_inner_mismatch():
    A = torch.ones((2, 3, 4))
    B = torch.ones((2, 3, 5))
    with pytest.raises(AssertionError) as e:
        FactoredMatrix(A, B)

    assert "inner dimension" in str(e.value)


# --- test_get_item.py ------------------------------------------------------------------------
@pytest.fixture
def sample_factored_matrix():
    A = torch.rand(2, 2, 2, 2, 2)
    B = torch.rand(2, 2, 2, 2, 2)
    return FactoredMatrix(A, B)


def test_getitem_int(sample_factored_matrix):
    result = sample_factored_matrix[0]
    assert_close(result.A, sample_factored_matrix.A[0])
    assert_close(result.B, sample_factored_matrix.B[0])


def test_getitem_tuple(sample_factored_matrix):
    result = sample_factored_matrix[(0, 1)]
    assert_close(result.A, sample_factored_matrix.A[0, 1])
    assert_close(result.B, sample_factored_matrix.B[0, 1])


def test_getitem_slice(sample_factored_matrix):
    result = sample_factored_matrix[:, 1]
    assert_close(result.A, sample_factored_matrix.A[:, 1])
    assert_close(result.B, sample_factored_matrix.B[:, 1])


def test_getitem_error(sample_factored_matrix):
    with pytest.raises(IndexError):
        _ = sample_factored_matrix[(0, 1, 2)]


def test_getitem_multiple_slices(sample_factored_matrix):
    result = sample_factored_matrix[:, :, 1]
    assert_close(result.A, sample_factored_matrix.A[:, :, 1])
    assert_close(result.B, sample_factored_matrix.B[:, :, 1])


def test_index_dimension_get_line(sample_factored_matrix):
    result = sample_factored_matrix[0, 0, 0, 1]
    assert_close(result.AB.squeeze(), sample_factored_matrix.AB[0, 0, 0, 1])


def test_index_dimension_get_element(sample_factored_matrix):
    result = sample_factored_matrix[0, 0, 0, 0, 1]
    assert_close(result.AB.squeeze(), sample_factored_matrix.AB[0, 0, 0, 0, 1])


def test_index_dimension_get_line_negative(sample_factored_matrix):
    result = sample_factored_matrix[0, 0, 0, -1]
    assert_close(result.AB.squeeze(), sample_factored_matrix.AB[0, 0, 0, -1])


def test_index_dimension_get_element_negative(sample_factored_matrix):
    result = sample_factored_matrix[0, 0, 0, 0, -1]
    assert_close(result.AB.squeeze(), sample_factored_matrix.AB[0, 0, 0, 0, -1])


def test_index_dimension_get_element_both_negative(sample_factored_matrix):
    result = sample_factored_matrix[0, 0, 0, -1, -1]
    assert_close(result.AB.squeeze(), sample_factored_matrix.AB[0, 0, 0, -1, -1])


def test_index_dimension_too_big(sample_factored_matrix):
    with pytest.raises(Exception):  # noqa: B017 (as written upstream)
        _ = sample_factored_matrix[1, 1, 1, 1, 1, 1]


def test_getitem_sequences(sample_factored_matrix):
    A_idx = [0, 1]
    B_idx = [0]
    result = sample_factored_matrix[:, :, :, A_idx, B_idx]
    assert_close(result.A, sample_factored_matrix.A[:, :, :, A_idx, :])
    assert_close(result.B, sample_factored_matrix.B[:, :, :, :, B_idx])


def test_getitem_sequences_and_ints(sample_factored_matrix):
    A_idx = [0, 1]
    B_idx = 0
    result = sample_factored_matrix[:, :, :, A_idx, B_idx]
    assert_close(result.A, sample_factored_matrix.A[:, :, :, A_idx, :])
    # we squeeze result.B, because indexing by ints is designed not to delete dimensions
    assert_close(result.B.squeeze(-1), sample_factored_matrix.B[:, :, :, :, B_idx])


def test_getitem_tensors(sample_factored_matrix):
    A_idx = torch.tensor([0, 1])
    B_idx = torch.tensor([0])
    result = sample_factored_matrix[:, :, :, A_idx, B_idx]
    assert_close(result.A, sample_factored_matrix.A[:, :, :, A_idx, :])
    assert_close(result.B, sample_factored_matrix.B[:, :, :, :, B_idx])


@pytest.mark.parametrize("leading_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize(
    "index,matrix_index",
    [
        ((Ellipsis,), (slice(None), slice(None))),
        ((Ellipsis, 1), (slice(None), slice(1, 2))),
        ((Ellipsis, -1), (slice(None), slice(-1, None))),
        ((Ellipsis, 1, slice(None)), (slice(1, 2), slice(None))),
        ((Ellipsis, -1, slice(None)), (slice(-1, None), slice(None))),
        ((Ellipsis, slice(1, 4), slice(2, 6)), (slice(1, 4), slice(2, 6))),
        ((None, Ellipsis, slice(1, 4), slice(None)), (slice(1, 4), slice(None))),
        ((Ellipsis, torch.tensor([1, 4])), (slice(None), torch.tensor([1, 4]))),
        ((Ellipsis, torch.tensor([1, 3]), slice(None)), (torch.tensor([1, 3]), slice(None))),
    ],
    ids=[
        "identity",
        "column",
        "last-column",
        "row",
        "last-row",
        "corner",
        "newaxis",
        "column-tensor",
        "row-tensor",
    ],
)
def test_getitem_ellipsis_matches_dense(
    leading_shape: tuple[int, ...], index: tuple, matrix_index: tuple
) -> None:
    # Unequal row, rank, and column sizes expose indexing into the hidden rank axis.
    matrix = FactoredMatrix(
        torch.randn(*leading_shape, 5, 2, dtype=torch.float64),
        torch.randn(*leading_shape, 2, 7, dtype=torch.float64),
    )
    prefix = (slice(None),) * len(leading_shape)
    if index[0] is None:
        prefix = (None, *prefix)
    expected = matrix.AB[prefix + matrix_index]

    result = matrix[index]

    assert isinstance(result, FactoredMatrix)
    assert result.mdim == matrix.mdim
    assert_close(result.AB, expected)


def test_getitem_ellipsis_between_tensor_and_column() -> None:
    matrix = FactoredMatrix(torch.randn(3, 5, 2), torch.randn(3, 2, 7))
    leading_index = torch.tensor([2, 0])
    result = matrix[leading_index, ..., 1]
    assert_close(result.AB, matrix.AB[leading_index, :, 1:2])


def test_getitem_zero_width_ellipsis() -> None:
    matrix = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 7))
    result = matrix[1, ..., 2]
    assert_close(result.AB, matrix.AB[1:2, 2:3])


def test_getitem_multiple_ellipses_raises(sample_factored_matrix) -> None:
    with pytest.raises(IndexError):
        _ = sample_factored_matrix[..., ...]


def test_getitem_ellipsis_too_many_indices_raises() -> None:
    matrix = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 7))
    with pytest.raises(ValueError, match="too long an index"):
        _ = matrix[..., 0, 0, 0]


def test_getitem_ellipsis_does_not_materialize_product(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = FactoredMatrix(torch.randn(3, 5, 2), torch.randn(3, 2, 7))
    expected = matrix.AB[..., 1:4, 2:6]

    def forbid_product(self):
        raise AssertionError("Indexing must not materialize the product")

    with monkeypatch.context() as context:
        context.setattr(FactoredMatrix, "AB", property(forbid_product))
        result = matrix[..., 1:4, 2:6]
    assert_close(result.AB, expected)


@pytest.mark.parametrize("mask_ndim", [1, 2], ids=["one-axis", "two-axes"])
@pytest.mark.parametrize("mask_format", ["tensor", "numpy", "list", "tuple"])
@pytest.mark.parametrize("selection", ["leading", "column", "row", "explicit-column", "newaxis"])
def test_getitem_bool_mask_matches_dense(mask_ndim: int, mask_format: str, selection: str) -> None:
    matrix = FactoredMatrix(
        torch.randn(2, 3, 5, 2, dtype=torch.float64),
        torch.randn(2, 3, 2, 7, dtype=torch.float64),
    )
    mask = (
        torch.tensor([True, False])
        if mask_ndim == 1
        else torch.tensor([[True, False, True], [False, True, False]])
    )
    selected = matrix.AB[mask]
    if mask_format == "numpy":
        mask = mask.numpy()
    elif mask_format == "list":
        mask = mask.tolist()
    elif mask_format == "tuple":
        values = mask.tolist()
        mask = tuple(tuple(row) for row in values) if mask_ndim == 2 else tuple(values)
    if selection == "leading":
        index = (mask, Ellipsis)
        expected = selected
    elif selection == "column":
        index = (mask, Ellipsis, 1)
        expected = selected[..., 1:2]
    elif selection == "row":
        index = (mask, Ellipsis, 1, slice(None))
        expected = selected[..., 1:2, :]
    elif selection == "explicit-column":
        index = (mask,) + (slice(None),) * (3 - mask_ndim) + (1,)
        expected = selected[..., 1:2]
    else:
        index = (None, mask, Ellipsis, 1)
        expected = selected[None, ..., 1:2]

    result = matrix[index]

    assert result.mdim == matrix.mdim
    assert_close(result.AB, expected)


@pytest.mark.parametrize("numpy_mask", [False, True], ids=["tensor", "numpy"])
def test_getitem_ellipsis_preserves_legacy_byte_mask(numpy_mask: bool) -> None:
    matrix = FactoredMatrix(torch.randn(2, 3, 5, 2), torch.randn(2, 3, 2, 7))
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8)
    expected = matrix.AB[mask.bool()]
    if numpy_mask:
        mask = mask.numpy()
    with pytest.warns(UserWarning, match="uint8"):
        result = matrix[mask, ...]
    assert_close(result.AB, expected)


@pytest.mark.parametrize("nested", [False, True], ids=["one-dimensional", "two-dimensional"])
@pytest.mark.parametrize("as_tuple", [False, True], ids=["list", "tuple"])
def test_getitem_integer_sequence_consumes_one_axis(nested: bool, as_tuple: bool) -> None:
    matrix = FactoredMatrix(torch.randn(2, 3, 5, 2), torch.randn(2, 3, 2, 7))
    index = [[1, 0], [0, 1]] if nested else [1, 0]
    expected = matrix.AB[torch.tensor(index), ..., 1:2]
    if as_tuple:
        index = tuple(tuple(row) for row in index) if nested else tuple(index)
    result = matrix[index, ..., 1]
    assert_close(result.AB, expected)


# --- test_multiply_by_factored_matrix.py ------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(
            (randn(3, 3), randn(3, 3)),
            (randn(3, 3), randn(3, 3)),
            id="both have ldim == mdim == rdim",
        ),
        pytest.param(
            (randn(1, 1), randn(1, 1)),
            (randn(1, 1), randn(1, 1)),
            id="both have ldim == mdim == rdim == 1",
        ),
        pytest.param(
            (randn(1, 2), randn(2, 1)),
            (randn(1, 6), randn(6, 1)),
            id="both have ldim == rdim == 1 != mdim",
        ),
        pytest.param(
            (randn(1, 1), randn(1, 1)),
            (randn(1, 2), randn(2, 5)),
            id="A has ldim == mdim == rdim == 1",
        ),
        pytest.param(
            (randn(5, 2), randn(2, 1)),
            (randn(1, 1), randn(1, 1)),
            id="B has ldim == mdim == rdim == 1",
        ),
        pytest.param(
            (randn(1, 2), randn(2, 3)),
            (randn(3, 2), randn(2, 4)),
            id="A has ldim == 1",
        ),
        pytest.param(
            (randn(3, 2), randn(2, 1)),
            (randn(1, 3), randn(3, 2)),
            id="B has ldim == 1",
        ),
        pytest.param(
            (randn(1, 2), randn(2, 5)),
            (randn(5, 3), randn(3, 1)),
            id="A has ldim == 1 and B has rdim == 1",
        ),
        pytest.param(
            (randn(3, 4), randn(4, 5)),
            (randn(5, 6), randn(6, 7)),
            id="both have rdim > mdim",
        ),
        pytest.param(
            (randn(8, 6), randn(6, 5)),
            (randn(5, 7), randn(7, 3)),
            id="both have rdim < mdim",
        ),
        pytest.param(
            (randn(3, 4), randn(4, 4)),
            (randn(4, 5), randn(5, 5)),
            id="both have rdim == mdim",
        ),
        pytest.param(
            (randn(7, 6), randn(6, 3)),
            (randn(3, 7), randn(7, 8)),
            id="A has rdim < mdim and B has rdim > mdim",
        ),
    ],
)
class TestFactoredMatrixMultiplication:
    @staticmethod
    def _test_multiply(a_left, a_right, b_left, b_right) -> FactoredMatrix:
        factored_a = FactoredMatrix(a_left, a_right)
        factored_b = FactoredMatrix(b_left, b_right)

        product = factored_a @ factored_b
        expected_product = (a_left @ a_right) @ (b_left @ b_right)
        assert torch.allclose(product.AB, expected_product, atol=1e-5)

        assert product.ldim == factored_a.ldim
        assert product.mdim == min(
            factored_a.mdim, factored_a.rdim, factored_b.ldim, factored_b.mdim
        )
        assert product.rdim == factored_b.rdim

        return product

    def test_multiply_two_factored_matrices(self, a, b):
        self._test_multiply(*a, *b)

    def test_multiply_when_A_has_leading_dim(self, a, b):
        a_left, a_right = a

        a_left_with_leading = repeat(a_left, "x y -> b x y", b=2)
        a_right_with_leading = repeat(a_right, "x y -> b x y", b=2)

        product = self._test_multiply(a_left_with_leading, a_right_with_leading, *b)

        assert product.A.shape[:1] == (2,)
        assert product.B.shape[:1] == (2,)

    def test_multiply_when_B_has_leading_dim(self, a, b):
        b_left, b_right = b

        b_left_with_leading = repeat(b_left, "x y -> b x y", b=2)
        b_right_with_leading = repeat(b_right, "x y -> b x y", b=2)

        product = self._test_multiply(*a, b_left_with_leading, b_right_with_leading)

        assert product.A.shape[:1] == (2,)
        assert product.B.shape[:1] == (2,)

    def test_multiply_when_both_have_leading_dim(self, a, b):
        a_left, a_right = a
        b_left, b_right = b

        a_left_with_leading = repeat(a_left, "x y -> b1 b2 x y", b1=2, b2=9)
        a_right_with_leading = repeat(a_right, "x y -> b1 b2 x y", b1=2, b2=9)
        b_left_with_leading = repeat(b_left, "x y -> b x y", b=9)
        b_right_with_leading = repeat(b_right, "x y -> b x y", b=9)

        product = self._test_multiply(
            a_left_with_leading,
            a_right_with_leading,
            b_left_with_leading,
            b_right_with_leading,
        )

        assert product.A.shape[:2] == (2, 9)
        assert product.B.shape[:2] == (2, 9)


@pytest.mark.parametrize(
    ("a", "b", "error"),
    [
        pytest.param(
            FactoredMatrix(randn(2, 3, 4), randn(2, 4, 6)),
            FactoredMatrix(randn(4, 6, 7), randn(4, 7, 2)),
            RuntimeError,
            id="Leading dim mismatch where each has one leading dim",
        ),
        pytest.param(
            FactoredMatrix(randn(2, 9, 3, 4), randn(2, 9, 4, 6)),
            FactoredMatrix(randn(2, 6, 7), randn(2, 7, 2)),
            RuntimeError,
            id="Leading dim mismatch where A has two leading dims and B has one",
        ),
        pytest.param(
            FactoredMatrix(randn(3, 4), randn(4, 6)),
            FactoredMatrix(randn(5, 6), randn(6, 7)),
            AssertionError,
            id="Inner dimension mismatch",
        ),
        pytest.param(
            FactoredMatrix(randn(3, 4), randn(4, 6)),
            FactoredMatrix(randn(2, 5, 6), randn(2, 6, 7)),
            AssertionError,
            id="Inner dimension mismatch with batch",
        ),
    ],
)
def test_matmul_dimension_mismatch(a, b, error):
    with pytest.raises(error):
        _ = a @ b


# --- test_multiply_by_matrix.py --------------------------------------------------------------
class MultiplyTestBase:
    @staticmethod
    def _test_multiply(a, b, matrix):
        raise NotImplementedError

    def test_left_multiply_by_matrix(self, a, b, matrix):
        self._test_multiply(a, b, matrix)

    def test_left_multiply_when_factored_matrix_has_leading_dim(self, a, b, matrix):
        a_with_leading = repeat(a, "x y -> b x y", b=2)
        b_with_leading = repeat(b, "x y -> b x y", b=2)

        product = self._test_multiply(a_with_leading, b_with_leading, matrix)

        assert product.A.shape[:-2] == (2,)
        assert product.B.shape[:-2] == (2,)

    def test_left_multiply_when_matrix_has_leading_dim(self, a, b, matrix):
        matrix_with_leading = repeat(matrix, "x y -> b1 b2 x y", b1=2, b2=12)

        product = self._test_multiply(a, b, matrix_with_leading)

        assert product.A.shape[:-2] == (2, 12)
        assert product.B.shape[:-2] == (2, 12)

    def test_left_multiply_when_both_have_leading_dim(self, a, b, matrix):
        a_with_leading = repeat(a, "x y -> b x y", b=2)
        b_with_leading = repeat(b, "x y -> b x y", b=2)
        matrix_with_leading = repeat(matrix, "x y -> b x y", b=2)

        product = self._test_multiply(a_with_leading, b_with_leading, matrix_with_leading)

        assert product.A.shape[:-2] == (2,)
        assert product.B.shape[:-2] == (2,)


@pytest.mark.parametrize(
    ("a", "b", "matrix"),
    [
        pytest.param(randn(2, 3), randn(3, 4), randn(4, 5), id="rdim > mdim"),
        pytest.param(randn(2, 6), randn(6, 4), randn(4, 5), id="rdim < mdim"),
        pytest.param(randn(2, 4), randn(4, 4), randn(4, 5), id="rdim == mdim"),
    ],
)
class TestLeftMultiplyByMatrix(MultiplyTestBase):
    @staticmethod
    def _test_multiply(a, b, matrix):
        fm = FactoredMatrix(a, b)

        product = fm @ matrix
        expected_product = (a @ b) @ matrix
        assert_close(product.AB, expected_product)

        assert product.ldim == fm.ldim
        assert product.mdim == min(fm.mdim, matrix.shape[-2])
        assert product.rdim == matrix.shape[-1]

        return product


@pytest.mark.parametrize(
    ("matrix", "a", "b"),
    [
        pytest.param(randn(6, 3), randn(3, 4), randn(4, 6), id="ldim > mdim"),
        pytest.param(randn(2, 6), randn(6, 4), randn(4, 2), id="ldim < mdim"),
        pytest.param(randn(2, 2), randn(2, 4), randn(4, 2), id="ldim == mdim"),
    ],
)
class TestRightMultiplyByMatrix(MultiplyTestBase):
    @staticmethod
    def _test_multiply(a, b, matrix):
        fm = FactoredMatrix(a, b)

        product = matrix @ fm
        expected_product = matrix @ (a @ b)
        assert_close(product.AB, expected_product)

        assert product.ldim == matrix.shape[-2]
        assert product.mdim == min(fm.mdim, matrix.shape[-1])
        assert product.rdim == fm.rdim

        return product


# --- test_multiply_by_scalar.py --------------------------------------------------------------
@pytest.mark.parametrize(
    "scalar, error_expected",
    [
        (torch.rand(1, generator=_GEN), None),
        (float(torch.rand(1, generator=_GEN).item()), None),
        (int(torch.randint(1, 10, (1,), generator=_GEN).item()), None),
        (torch.rand(2, 2, generator=_GEN), AssertionError),
        (torch.rand(2, generator=_GEN), AssertionError),
    ],
)
@pytest.mark.parametrize("leading_dim", [False, True])
@pytest.mark.parametrize("multiply_from_left", [False, True])
def test_multiply(scalar, leading_dim, multiply_from_left, error_expected):
    if leading_dim:
        a = torch.rand(6, 2, 3)
        b = torch.rand(6, 3, 4)
    else:
        a = torch.rand(2, 3)
        b = torch.rand(3, 4)

    fm = FactoredMatrix(a, b)

    if error_expected:
        with pytest.raises(error_expected):
            if multiply_from_left:  # noqa: SIM108 (as written upstream)
                _ = fm * scalar
            else:
                _ = scalar * fm
    else:
        if multiply_from_left:
            assert_close((fm * scalar).AB, (a @ b) * scalar)
        else:
            assert_close((scalar * fm).AB, (a @ b) * scalar)


# --- test_multiply_by_tensor_like.py ---------------------------------------------------------
class TensorLike:
    """A wrapper that exposes the tensor protocol without subclassing torch.Tensor."""

    def __init__(self, tensor):
        self._tensor = tensor

    @property
    def ndim(self):
        return self._tensor.ndim

    @property
    def shape(self):
        return self._tensor.shape

    def size(self, dim=None):
        return self._tensor.size() if dim is None else self._tensor.size(dim)

    def unsqueeze(self, dim):
        return TensorLike(self._tensor.unsqueeze(dim))

    def squeeze(self, dim):
        return TensorLike(self._tensor.squeeze(dim))

    def broadcast_to(self, shape):
        return TensorLike(self._tensor.broadcast_to(shape))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return NotImplemented
        if isinstance(other, TensorLike):
            return TensorLike(self._tensor @ other._tensor)
        return TensorLike(self._tensor @ other)

    def __rmatmul__(self, other):
        if isinstance(other, TensorLike):
            return TensorLike(other._tensor @ self._tensor)
        return TensorLike(other @ self._tensor)


tensor_like_refused = pytest.mark.xfail(
    reason="deliberate: mitk's FactoredMatrix @ takes torch tensors and FactoredMatrix objects "
    "(shape-annotated); other operands get NotImplemented",
    strict=True,
)


@tensor_like_refused
def test_left_multiply_factored_matrix_by_tensor_like_matrix():
    a = randn(2, 3)
    b = randn(3, 4)
    matrix = randn(4, 5)
    factored_matrix = FactoredMatrix(a, b)

    result = factored_matrix @ TensorLike(matrix)

    assert result is not None, "matmul with tensor-like silently returned None"
    assert isinstance(result, FactoredMatrix)
    expected = (a @ b) @ matrix
    assert isinstance(result.AB, TensorLike)
    assert_close(result.AB._tensor, expected)


@tensor_like_refused
def test_right_multiply_factored_matrix_by_tensor_like_matrix():
    a = randn(3, 4)
    b = randn(4, 6)
    matrix = randn(5, 3)
    factored_matrix = FactoredMatrix(a, b)

    result = TensorLike(matrix) @ factored_matrix

    assert result is not None, "rmatmul with tensor-like silently returned None"
    assert isinstance(result, FactoredMatrix)
    expected = matrix @ (a @ b)
    assert isinstance(result.AB, TensorLike)
    assert_close(result.AB._tensor, expected)


def test_left_multiply_factored_matrix_by_tensor_like_vector():  # its __rmatmul__ answers
    a = randn(2, 3)
    b = randn(3, 4)
    vector = randn(4)
    factored_matrix = FactoredMatrix(a, b)

    result = factored_matrix @ TensorLike(vector)

    assert isinstance(result, TensorLike)
    expected = (a @ b) @ vector
    assert_close(result._tensor, expected)


# --- test_multiply_by_vector.py --------------------------------------------------------------
def test_left_matmul_by_vector_left():
    a = torch.rand(2, 3)
    b = torch.rand(3, 4)

    fm = FactoredMatrix(a, b)
    vector = torch.rand(4)

    assert_close(fm @ vector, (a @ b) @ vector)


def test_left_matmul_by_vector_leading_dim():
    a = torch.rand(6, 2, 3)
    b = torch.rand(6, 3, 4)

    fm = FactoredMatrix(a, b)
    vector = torch.rand(4)

    assert_close(fm @ vector, (a @ b) @ vector)


def test_right_matmul_by_vector():
    a = torch.rand(2, 3)
    b = torch.rand(3, 4)

    fm = FactoredMatrix(a, b)
    vector = torch.rand(2)

    assert_close(vector @ fm, vector @ (a @ b))


def test_right_matmul_by_vector_leading_dim():
    a = torch.rand(6, 2, 3)
    b = torch.rand(6, 3, 4)

    fm = FactoredMatrix(a, b)
    vector = torch.rand(2)

    assert_close(vector @ fm, vector @ (a @ b))


# --- test_matmul_tensor.py -------------------------------------------------------------------
@pytest.mark.skip(
    reason="torch.equal of A @ (B @ v) and (A @ B) @ v differs by rounding on most random "
    "draws, for transformer-lens too; test_left_matmul_by_vector_left checks it with assert_close"
)
def test_matmul_by_vector():
    a = torch.rand(2, 3)
    b = torch.rand(3, 4)

    fm = FactoredMatrix(a, b)

    vector = torch.rand(4)

    assert torch.equal(fm @ vector, (a @ b) @ vector)


# --- test_properties.py ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_matrices():
    return [
        (randn(3, 2), randn(2, 3)),
        (randn(4, 5), randn(5, 4)),
        (randn(6, 7), randn(7, 6)),
        (randn(6, 7), randn(7, 3)),
    ]


@pytest.fixture(scope="module")
def factored_matrices(random_matrices):
    return [FactoredMatrix(a, b) for a, b in random_matrices]


@pytest.fixture(scope="module")
def random_matrices_leading_ones():
    return [
        (randn(1, 8, 9), randn(1, 9, 8)),
    ]


@pytest.fixture(scope="module")
def factored_matrices_leading_ones(random_matrices_leading_ones):
    return [FactoredMatrix(a, b) for a, b in random_matrices_leading_ones]


@pytest.fixture(scope="module")
def random_matrices_bf16():
    return [
        (randn(3, 2).to(torch.bfloat16), randn(2, 3).to(torch.bfloat16)),
        (randn(10, 4).to(torch.bfloat16), randn(4, 10).to(torch.bfloat16)),
    ]


@pytest.fixture(scope="module")
def factored_matrices_bf16(random_matrices_bf16):
    return [FactoredMatrix(a, b) for a, b in random_matrices_bf16]


class TestFactoredMatrixProperties:
    def test_AB_property(self, factored_matrices, random_matrices):
        for i, factored_matrix in enumerate(factored_matrices):
            a, b = random_matrices[i]
            expected_AB = a @ b
            assert torch.allclose(factored_matrix.AB, expected_AB, atol=1e-5)

    def test_BA_property(self, factored_matrices, random_matrices):
        for i, factored_matrix in enumerate(factored_matrices):
            a, b = random_matrices[i]
            if a.shape[-2] == b.shape[-1]:
                expected_BA = b @ a
                assert torch.allclose(factored_matrix.BA, expected_BA, atol=1e-5)
            else:
                with pytest.raises(AssertionError):
                    _ = factored_matrix.BA

    def test_transpose_property(self, factored_matrices):
        for factored_matrix in factored_matrices:
            transposed_factored_matrix = factored_matrix.T
            assert torch.allclose(
                transposed_factored_matrix.A,
                factored_matrix.B.transpose(-2, -1),
                atol=1e-5,
            )
            assert torch.allclose(
                transposed_factored_matrix.B,
                factored_matrix.A.transpose(-2, -1),
                atol=1e-5,
            )

    def test_svd_property(self, factored_matrices):
        for factored_matrix in factored_matrices:
            U, S, Vh = factored_matrix.svd()
            assert torch.allclose(factored_matrix.AB, U @ torch.diag_embed(S) @ Vh.T, atol=1e-5)
            # test that U and Vh are unitary
            assert torch.allclose(U.T @ U, torch.eye(U.shape[-1]), atol=1e-5)
            assert torch.allclose(Vh.T @ Vh, torch.eye(Vh.shape[-1]), atol=1e-5)

    def test_svd_property_leading_ones(self, factored_matrices_leading_ones):
        for factored_matrix in factored_matrices_leading_ones:
            U, S, Vh = factored_matrix.svd()
            assert torch.allclose(factored_matrix.AB, U @ torch.diag_embed(S) @ Vh.mT, atol=1e-5)
            # test that U and Vh are unitary
            assert torch.allclose(U.mT @ U, torch.eye(U.shape[-1]), atol=1e-5)
            assert torch.allclose(Vh.mT @ Vh, torch.eye(Vh.shape[-1]), atol=1e-5)

    def test_eigenvalues_property(self, factored_matrices):
        for factored_matrix in factored_matrices:
            if factored_matrix.ldim == factored_matrix.rdim:
                eigenvalues = factored_matrix.eigenvalues
                expected_eigenvalues = torch.linalg.eig(
                    factored_matrix.B @ factored_matrix.A
                ).eigenvalues
                assert torch.allclose(
                    torch.abs(eigenvalues), torch.abs(expected_eigenvalues), atol=1e-5
                )
            else:
                with pytest.raises(AssertionError):
                    _ = factored_matrix.eigenvalues

    def test_ndim_property(self, factored_matrices, random_matrices):
        for i, factored_matrix in enumerate(factored_matrices):
            a, b = random_matrices[i]
            expected_ndim = max(a.ndim, b.ndim)
            assert factored_matrix.ndim == expected_ndim

    def test_pair_property(self, factored_matrices, random_matrices):
        for i, factored_matrix in enumerate(factored_matrices):
            a, b = random_matrices[i]
            assert torch.allclose(factored_matrix.pair[0], a, atol=1e-5)
            assert torch.allclose(factored_matrix.pair[1], b, atol=1e-5)

    def test_norm_property(self, factored_matrices):
        for factored_matrix in factored_matrices:
            assert torch.allclose(factored_matrix.norm(), factored_matrix.AB.norm(), atol=1e-5)

    def test_get_corner(self, factored_matrices):
        for factored_matrix in factored_matrices:
            k = 3
            result = factored_matrix.get_corner(k)
            expected = utils.get_corner(
                factored_matrix.A[..., :k, :] @ factored_matrix.B[..., :, :k], k
            )
            assert torch.allclose(result, expected)

    def test_ndim(self, factored_matrices):
        for factored_matrix in factored_matrices:
            assert factored_matrix.ndim == len(factored_matrix.shape)

    def test_collapse_l(self, factored_matrices):
        for factored_matrix in factored_matrices:
            result = factored_matrix.collapse_l()
            expected = factored_matrix.S[..., :, None] * utils.transpose(factored_matrix.V)
            assert torch.allclose(result, expected)

    def test_V_and_Vh_alias_match(self, factored_matrices):
        import warnings

        for factored_matrix in factored_matrices:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                vh_value = factored_matrix.Vh
            assert any(issubclass(w.category, DeprecationWarning) for w in caught)
            assert torch.equal(vh_value, factored_matrix.V)

    def test_svd_caches_per_instance(self):
        """svd() should cache its result on the instance: repeated calls, the same tensors."""
        m = FactoredMatrix(randn(4, 3), randn(3, 4))
        first_U, first_S, first_V = m.svd()
        second_U, second_S, second_V = m.svd()
        assert first_U is second_U
        assert first_S is second_S
        assert first_V is second_V

    def test_svd_does_not_prevent_gc(self):
        """svd's cache must not hold a reference that keeps the instance from being GC'd."""
        import gc
        import weakref

        m = FactoredMatrix(randn(4, 3), randn(3, 4))
        _ = m.svd()  # populate the cache
        ref = weakref.ref(m)
        del m
        gc.collect()
        assert ref() is None, (
            "FactoredMatrix instance survived deletion — svd cache is leaking references."
        )

    def test_collapse_r(self, factored_matrices):
        for factored_matrix in factored_matrices:
            result = factored_matrix.collapse_r()
            expected = factored_matrix.U * factored_matrix.S[..., None, :]
            assert torch.allclose(result, expected)

    def test_unsqueeze(self, factored_matrices_leading_ones):
        for factored_matrix in factored_matrices_leading_ones:
            k = 0
            unsqueezed_A = factored_matrix.A.unsqueeze(k)
            unsqueezed_B = factored_matrix.B.unsqueeze(k)
            inner_dim_A = unsqueezed_A.size(-1)
            inner_dim_B = unsqueezed_B.size(-2)

            if inner_dim_A == inner_dim_B:
                result = FactoredMatrix(unsqueezed_A, unsqueezed_B)
                assert isinstance(result, FactoredMatrix)
                assert torch.allclose(result.A, unsqueezed_A)
                assert torch.allclose(result.B, unsqueezed_B)

    @pytest.mark.xfail(
        reason="deliberate: mitk upcasts 16-bit factors before multiplying (BA in float32); the "
        "test compares with eig of BA multiplied in bfloat16, which is further from the exact "
        "eigenvalues (tests/unit/test_factored_matrix.py checks mitk is the closer one)",
        strict=True,
    )
    def test_eigenvalues_bfloat16_support(self, factored_matrices_bf16):
        """
        Test that eigenvalues calculation does nott crash for bfloat16 matrices.
        """
        for factored_matrix in factored_matrices_bf16:
            if factored_matrix.ldim == factored_matrix.rdim:
                eigenvalues = factored_matrix.eigenvalues

                assert eigenvalues.dtype == torch.complex64

                expected_eigenvalues = torch.linalg.eig(
                    factored_matrix.BA.to(torch.float32)
                ).eigenvalues

                assert torch.allclose(
                    torch.abs(eigenvalues), torch.abs(expected_eigenvalues), atol=1e-2, rtol=1e-2
                )
