"""FactoredMatrix: a low-rank product ``A @ B`` kept as its two factors.

QK and OV circuits are ``d_model × d_model`` (or ``d_vocab × d_vocab``) matrices
of rank at most ``d_head``. Kept factored, their products, norms, SVDs and
eigenvalues cost ``O(size · rank²)`` and the full matrix is never allocated.

Names and behaviour follow TransformerLens so its tutorials carry over: ``ldim``
rows, ``mdim`` the inner (rank-bounding) width, ``rdim`` columns; leading dims
(e.g. ``[layer, head]``) broadcast like ``torch.matmul``; ``@`` with a vector
gives a plain tensor; ``svd()`` gives ``(U, S, V)``; shape errors are
``AssertionError``s (``ShapeMismatchError`` is one). Deliberate differences:
``get_corner`` keeps leading dims whole; ``@`` takes torch tensors and
FactoredMatrix objects only (other operands get ``NotImplemented``, Python's
"not mine" answer); ``norm()`` is computed through a QR factor, not the SVD.
"""

from __future__ import annotations

from types import EllipsisType
from typing import Any, overload
import warnings

from jaxtyping import Complex
import numpy as np
import torch
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.shapes import Float

Scalar = int | float | Tensor
IndexItem = int | slice | Tensor | EllipsisType | None
_MASK_DTYPES = (torch.bool, torch.uint8)


class BroadcastMismatchError(ShapeMismatchError, RuntimeError):
    """Leading dims that do not broadcast; also the ``RuntimeError`` torch raises for that."""


def _upcast(x: Tensor) -> Tensor:
    # QR, SVD and eig have no 16-bit kernels; float32 is the smallest dtype they accept
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _broadcast(what: str, left: torch.Size, right: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(left, right)
    except RuntimeError as err:
        raise BroadcastMismatchError(
            f"leading-dim mismatch: {what} {tuple(left)} and {tuple(right)} do not broadcast"
        ) from err


# --- indexing ----------------------------------------------------------------------------
def _as_index(item: object) -> IndexItem:
    """One element of an index: lists, tuples and arrays become tensors; numpy ints, ints."""
    if item is None or isinstance(item, EllipsisType | slice | Tensor):
        return item
    if isinstance(item, bool):
        raise ShapeMismatchError("FactoredMatrix takes no bare True/False index; use a bool mask")
    if isinstance(item, int | np.integer):
        return int(item)
    if isinstance(item, list | tuple | np.ndarray):
        as_tensor = torch.as_tensor(item)
        return as_tensor.long() if as_tensor.numel() == 0 else as_tensor
    raise ShapeMismatchError(f"cannot index a FactoredMatrix with {type(item).__name__}")


def _width(item: IndexItem) -> int:
    """How many dims an index element consumes (a mask: its own ndim; a new axis: none)."""
    if item is None:
        return 0
    if isinstance(item, Tensor) and item.dtype in _MASK_DTYPES:
        if item.ndim == 0:
            raise ShapeMismatchError("FactoredMatrix takes no 0-d mask; index with a bool mask")
        return item.ndim
    return 1


def _split_index(index: object, ndim: int) -> tuple[list[IndexItem], IndexItem, IndexItem]:
    """``index`` as (leading-dim index, row index, column index), ``...`` expanded.

    As in torch, a short index leaves the trailing dims whole and ``...`` fills
    the dims nobody names, so ``fm[..., 1:4, 2:6]`` picks rows and columns.
    """
    items = [_as_index(i) for i in (index if isinstance(index, tuple) else (index,))]
    ellipses = [pos for pos, item in enumerate(items) if item is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = sum(_width(item) for item in items if item is not Ellipsis)
    if used > ndim:
        raise ShapeMismatchError(
            f"{index!r} is too long an index for a FactoredMatrix with {ndim} dims "
            f"(leading dims, then rows and columns)"
        )
    fill: list[IndexItem] = [slice(None)] * (ndim - used)
    if ellipses:
        items[ellipses[0] : ellipses[0] + 1] = fill
    else:
        items += fill
    consumed, start = 0, len(items)  # start: the item indexing the rows
    for pos, item in enumerate(items):
        if consumed == ndim - 2 and item is not None:
            start = pos
            break
        consumed += _width(item)
        if consumed > ndim - 2:
            raise ShapeMismatchError("a mask cannot span leading dims and the matrix's rows")
    rest = items[start:]
    if len(rest) != 2 or any(item is None or _width(item) != 1 for item in rest):
        raise ShapeMismatchError(
            "rows and columns take one index each (int, slice or 1-D indices); "
            "None adds leading dims only"
        )
    return items[:start], rest[0], rest[1]


def _matrix_index(item: IndexItem) -> slice | Tensor:
    """A row or column index that keeps the dim: an int becomes a length-1 slice."""
    if isinstance(item, Tensor) and item.ndim == 0:
        item = int(item)
    if isinstance(item, int):
        return slice(item, item + 1 if item != -1 else None)
    if isinstance(item, slice) or (isinstance(item, Tensor) and item.ndim == 1):
        return item
    raise ShapeMismatchError("rows and columns take an int, a slice or 1-D indices")


class FactoredMatrix:
    """The matrix ``A @ B`` held as ``A [..., ldim, mdim]`` and ``B [..., mdim, rdim]``.

    Leading dims of ``A`` and ``B`` broadcast against each other (the stored
    factors are broadcast views, no copies). Linear-algebra results of float16
    or bfloat16 factors come back in float32. The SVD is computed once per
    FactoredMatrix: treat the factors as fixed.
    """

    def __init__(
        self, A: Float[Tensor, "*batch_a ldim mdim"], B: Float[Tensor, "*batch_b mdim_b rdim"]
    ) -> None:
        # the two inner widths get distinct names above so a mismatch reaches the clear error here
        if A.shape[-1] != B.shape[-2]:
            raise ShapeMismatchError(
                f"factors do not chain on their inner dimension: A is {tuple(A.shape)}, "
                f"B is {tuple(B.shape)} (A's last dim must equal B's second-to-last)"
            )
        batch = _broadcast("leading dims of A and B", A.shape[:-2], B.shape[:-2])
        self.A: Tensor = A.broadcast_to((*batch, *A.shape[-2:]))
        self.B: Tensor = B.broadcast_to((*batch, *B.shape[-2:]))
        self._svd: tuple[Tensor, ...] | None = None  # (A, B, U, S, V) once computed

    # --- shape --------------------------------------------------------------------------
    @property
    def ldim(self) -> int:
        """Rows of ``A @ B``."""
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        """Inner width of the factors: an upper bound on the rank."""
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        """Columns of ``A @ B``."""
        return self.B.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """``(*leading, ldim, rdim)``: the shape ``AB`` would have."""
        return torch.Size((*self.A.shape[:-2], self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        """Number of dims of ``AB``, leading dims included."""
        return self.A.ndim

    @property
    def has_leading_dims(self) -> bool:
        """Whether there are dims before the matrix's rows and columns."""
        return self.A.ndim > 2

    @property
    def pair(self) -> tuple[Float[Tensor, "*batch ldim mdim"], Float[Tensor, "*batch mdim rdim"]]:
        """The factors ``(A, B)``."""
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"

    # --- products -----------------------------------------------------------------------
    @property
    def AB(self) -> Float[Tensor, "*batch ldim rdim"]:
        """The full product; allocates ``ldim × rdim`` per leading index."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "*batch mdim mdim"]:
        """The small ``mdim × mdim`` product ``B @ A``; needs a square matrix (``ldim == rdim``)."""
        self._require_square("BA")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, still factored: ``(AB)ᵀ = Bᵀ Aᵀ``."""
        return FactoredMatrix(self.B.mT, self.A.mT)

    @overload
    def __matmul__(self, other: FactoredMatrix) -> FactoredMatrix: ...
    @overload  # a FactoredMatrix for a matrix, a Tensor for a vector: ranks are not in types
    def __matmul__(self, other: Tensor) -> Any: ...
    def __matmul__(self, other: FactoredMatrix | Tensor) -> FactoredMatrix | Tensor:
        """``self @ other``: still factored for a matrix ``[..., rdim, p]`` or a FactoredMatrix.

        The result's inner width is the smallest available: of ``mdim`` and
        ``rdim`` (a plain matrix) or of ``mdim``, ``other.mdim`` and ``rdim``
        (a FactoredMatrix). A vector ``[rdim]`` gives the plain tensor
        ``AB @ v`` ``[..., ldim]``, computed as ``A @ (B @ v)``.
        """
        if isinstance(other, FactoredMatrix):
            return self._compose(other)
        if not isinstance(other, Tensor):
            return NotImplemented
        _require_not_scalar(other)
        self._require_chain(self.rdim, other.shape[-2 if other.ndim > 1 else 0], other)
        if other.ndim == 1:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        _broadcast("leading dims", self.shape[:-2], other.shape[:-2])
        if self.mdim <= self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix | Tensor:
        """``other @ self``: still factored for a matrix ``[..., p, ldim]`` (see ``__matmul__``).

        A vector ``[ldim]`` gives the plain tensor ``v @ AB`` ``[..., rdim]``.
        """
        if not isinstance(other, Tensor):
            return NotImplemented
        _require_not_scalar(other)
        self._require_chain(other.shape[-1], self.ldim, other)
        if other.ndim == 1:
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        _broadcast("leading dims", other.shape[:-2], self.shape[:-2])
        if self.mdim <= self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _compose(self, other: FactoredMatrix) -> FactoredMatrix:
        """``(A₁B₁)(A₂B₂)`` through the narrowest of the three available inner widths."""
        self._require_chain(self.rdim, other.ldim, other)
        _broadcast("leading dims", self.shape[:-2], other.shape[:-2])
        if self.rdim < min(self.mdim, other.mdim):
            return FactoredMatrix(self.AB, other.AB)
        core = self.B @ other.A  # [..., mdim₁, mdim₂]: the only product either route needs
        if self.mdim <= other.mdim:
            return FactoredMatrix(self.A, core @ other.B)
        return FactoredMatrix(self.A @ core, other.B)

    def __mul__(self, scalar: Scalar) -> FactoredMatrix:
        """Scale by a number (or one-element tensor); only ``A`` is touched."""
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ShapeMismatchError(
                f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for products"
            )
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar: Scalar) -> FactoredMatrix:
        return self * scalar

    # --- spectra and norms ------------------------------------------------------------
    def svd(
        self,
    ) -> tuple[
        Float[Tensor, "*batch ldim k"], Float[Tensor, "*batch k"], Float[Tensor, "*batch rdim k"]
    ]:
        """Thin SVD ``(U, S, V)`` with ``AB == U @ diag(S) @ Vᵀ``, ``k = min(ldim, mdim, rdim)``.

        The convention of TransformerLens (and ``torch.svd``): the third factor is
        ``V``, not ``Vᵀ``. Computed from the factors: ``A = Q_a R_a`` and
        ``Bᵀ = Q_b R_b`` (QR), then the SVD of the small core ``R_a R_bᵀ``.
        Singular values descend; signs of paired singular vectors are arbitrary.
        Computed once and kept, as TransformerLens does (factors reassigned since
        are noticed; factors edited in place are not).
        """
        cached = self._svd
        if cached is None or cached[0] is not self.A or cached[1] is not self.B:
            q_a, r_a = torch.linalg.qr(_upcast(self.A))
            q_b, r_b = torch.linalg.qr(_upcast(self.B).mT)
            u_core, s, vh_core = torch.linalg.svd(r_a @ r_b.mT, full_matrices=False)
            cached = self._svd = (self.A, self.B, q_a @ u_core, s, q_b @ vh_core.mT)
        return cached[2], cached[3], cached[4]

    @property
    def U(self) -> Float[Tensor, "*batch ldim k"]:
        """Left singular vectors (``svd()[0]``)."""
        return self.svd()[0]

    @property
    def S(self) -> Float[Tensor, "*batch k"]:
        """Singular values, descending (``svd()[1]``)."""
        return self.svd()[1]

    @property
    def V(self) -> Float[Tensor, "*batch rdim k"]:
        """Right singular vectors as columns (``svd()[2]``)."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[Tensor, "*batch rdim k"]:
        """Deprecated: ``V`` under TransformerLens's old name (it holds ``V``, not ``Vᵀ``)."""
        warnings.warn(
            "FactoredMatrix.Vh holds V (right singular vectors as columns), not Vᵀ; use .V "
            "(TransformerLens deprecates .Vh too)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U √S, √S Vᵀ)``: each factor holds half of each singular value."""
        u, s, v = self.svd()
        root = s.sqrt()
        return FactoredMatrix(u * root[..., None, :], root[..., :, None] * v.mT)

    def collapse_l(self) -> Float[Tensor, "*batch k rdim"]:
        """``diag(S) @ Vᵀ``: ``AB`` with its orthonormal left factor ``U`` dropped.

        Shares ``AB``'s Gram matrix ``(AB)ᵀ(AB)``, so ``‖AB @ Y‖_F`` equals
        ``‖collapse_l() @ Y‖_F`` for any ``Y``, with ``k`` rows instead of ``ldim``.
        """
        _, s, v = self.svd()
        return s[..., :, None] * v.mT

    def collapse_r(self) -> Float[Tensor, "*batch ldim k"]:
        """``U @ diag(S)``: ``AB`` with its orthonormal right factor ``Vᵀ`` dropped.

        ``‖X @ AB‖_F`` equals ``‖X @ collapse_r()‖_F`` for any ``X``.
        """
        u, s, _ = self.svd()
        return u * s[..., None, :]

    def norm(self) -> Float[Tensor, "*batch"]:
        """Frobenius norm of ``AB`` per leading index, as ``‖R_a B‖`` where ``A = Q_a R_a``.

        ``Q_a`` has orthonormal columns, so dropping it leaves the norm unchanged;
        this avoids the cancellation a Gram-matrix trace formula would suffer.
        """
        _, r_a = torch.linalg.qr(_upcast(self.A))
        return torch.linalg.matrix_norm(r_a @ _upcast(self.B))

    @property
    def eigenvalues(self) -> Complex[Tensor, "*batch mdim"]:
        """The ``mdim`` eigenvalues of the small ``BA``, in no particular order.

        ``AB`` and ``BA`` share their nonzero eigenvalues (``BAv = λv`` gives
        ``AB(Av) = λ(Av)``), so these are ``AB``'s nonzero eigenvalues padded with
        zeros; ``AB``'s remaining ``ldim - mdim`` eigenvalues are all zero.
        Needs ``ldim == rdim``.
        """
        self._require_square("eigenvalues")
        return torch.linalg.eigvals(_upcast(self.B) @ _upcast(self.A))

    # --- indexing -----------------------------------------------------------------------
    def __getitem__(self, index: object) -> FactoredMatrix:
        """Index leading dims (``fm[layer, head]``, ``fm[[0, 2]]``), then rows and columns.

        Leading dims take what a tensor takes (ints, slices, index lists or
        tensors, bool masks, ``None`` for a new dim, one ``...``). Rows and
        columns take an int, a slice or 1-D indices and the result stays a
        matrix (an int keeps a length-1 dim). ``...`` stands for the dims left
        unnamed, so ``fm[..., 0]`` is the first column. The product is never formed.
        """
        lead, rows, cols = _split_index(index, self.ndim)
        A, B = self.A, self.B
        if lead:
            A, B = A[(*lead, Ellipsis)], B[(*lead, Ellipsis)]
        # rows and columns in a second step, so their indices never pair up with leading ones
        return FactoredMatrix(A[..., _matrix_index(rows), :], B[..., :, _matrix_index(cols)])

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """A new length-1 leading dim at position ``k`` (counted as in ``Tensor.unsqueeze``)."""
        pos = k + self.ndim + 1 if k < 0 else k
        if not 0 <= pos <= self.ndim - 2:
            raise ShapeMismatchError(
                f"unsqueeze({k}) would split the matrix dims of a FactoredMatrix with "
                f"{self.ndim} dims; new dims go before the last two"
            )
        return FactoredMatrix(self.A.unsqueeze(pos), self.B.unsqueeze(pos))

    def get_corner(self, k: int = 3) -> Float[Tensor, "*batch k_rows k_cols"]:
        """The top-left ``k × k`` block of ``AB`` (fewer if the matrix is smaller).

        Leading dims are kept whole (TransformerLens also cuts them to ``k``).
        """
        return self.A[..., :k, :] @ self.B[..., :, :k]

    # --- checks -------------------------------------------------------------------------
    def _require_square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise ShapeMismatchError(
                f"{what} needs a square matrix; this FactoredMatrix is {tuple(self.shape)}"
            )

    def _require_chain(self, left: int, right: int, other: FactoredMatrix | Tensor) -> None:
        if left != right:
            raise ShapeMismatchError(
                f"cannot multiply: inner dims {left} and {right} differ "
                f"(FactoredMatrix {tuple(self.shape)}, other {tuple(other.shape)})"
            )


def _require_not_scalar(other: Tensor) -> None:
    if other.ndim == 0:
        raise ShapeMismatchError("FactoredMatrix @ needs a vector or a matrix; use * for a number")
