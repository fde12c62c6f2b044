"""FactoredMatrix: a low-rank product ``A @ B`` kept as its two factors.

QK and OV circuits are ``d_model × d_model`` (or ``d_vocab × d_vocab``) matrices
of rank at most ``d_head``. Kept factored, their products, norms, SVDs and
eigenvalues cost ``O(size · rank²)`` and the full matrix is never allocated.

Names follow TransformerLens so its tutorials carry over: ``ldim`` rows,
``mdim`` the inner (rank-bounding) width, ``rdim`` columns; leading dims (e.g.
``[layer, head]``) broadcast like ``torch.matmul``. One deliberate difference:
``svd()`` returns ``(U, S, Vh)`` as ``torch.linalg.svd`` does, where
TransformerLens returns ``V``.
"""

from __future__ import annotations

from jaxtyping import Complex
import torch
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.shapes import Float

Index = int | slice | Tensor
Scalar = int | float | Tensor


def _upcast(x: Tensor) -> Tensor:
    # QR, SVD and eig have no 16-bit kernels; float32 is the smallest dtype they accept
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _keep_dim(index: Index) -> slice:
    """An int row/column index as a length-1 slice, so the result stays a matrix."""
    if isinstance(index, slice):
        return index
    if isinstance(index, int):
        return slice(index, index + 1 if index != -1 else None)
    raise ShapeMismatchError(
        "FactoredMatrix indexes its row and column dims by int or slice only; "
        f"got {type(index).__name__}"
    )


def _require_matrix(other: Tensor) -> None:
    if other.ndim < 2:
        raise ShapeMismatchError(
            f"FactoredMatrix @ needs a matrix, got shape {tuple(other.shape)}: "
            "use * for a number and v[:, None] (a one-column matrix) for a vector"
        )


class FactoredMatrix:
    """The matrix ``A @ B`` held as ``A [..., ldim, mdim]`` and ``B [..., mdim, rdim]``.

    Leading dims of ``A`` and ``B`` broadcast against each other (the stored
    factors are broadcast views, no copies). Linear-algebra results of float16
    or bfloat16 factors come back in float32.
    """

    def __init__(
        self, A: Float[Tensor, "*batch_a ldim mdim"], B: Float[Tensor, "*batch_b mdim_b rdim"]
    ) -> None:
        # the two inner widths get distinct names above so a mismatch reaches the clear error here
        if A.shape[-1] != B.shape[-2]:
            raise ShapeMismatchError(
                f"factors do not chain: A is {tuple(A.shape)}, B is {tuple(B.shape)} "
                "(A's last dim must equal B's second-to-last)"
            )
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as err:
            raise ShapeMismatchError(
                f"leading dims of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast"
            ) from err
        self.A: Tensor = A.broadcast_to((*batch, *A.shape[-2:]))
        self.B: Tensor = B.broadcast_to((*batch, *B.shape[-2:]))

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

    # operands are typed loosely so a wrong shape reaches the explanatory errors below
    def __matmul__(self, other: FactoredMatrix | Tensor) -> FactoredMatrix:
        """``self @ other`` for a matrix ``[..., rdim, p]`` or a FactoredMatrix, still factored.

        The result's inner width is the smaller of ``mdim`` and ``rdim`` (a plain
        matrix) or of ``mdim``, ``other.mdim`` and ``rdim`` (a FactoredMatrix).
        For a vector ``v`` use ``self @ v[:, None]``, or ``(self @ v[:, None]).AB[..., 0]``.
        """
        if isinstance(other, FactoredMatrix):
            return self._compose(other)
        _require_matrix(other)
        self._require_chain(self.rdim, other.shape[-2], other)
        if self.mdim <= self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix:
        """``other @ self`` for a matrix ``[..., p, ldim]``, still factored (see ``__matmul__``)."""
        _require_matrix(other)
        self._require_chain(other.shape[-1], self.ldim, other)
        if self.mdim <= self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _compose(self, other: FactoredMatrix) -> FactoredMatrix:
        """``(A₁B₁)(A₂B₂)`` through the narrowest of the three available inner widths."""
        self._require_chain(self.rdim, other.ldim, other)
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
        """
        q_a, r_a = torch.linalg.qr(_upcast(self.A))
        q_b, r_b = torch.linalg.qr(_upcast(self.B).mT)
        u_core, s, vh_core = torch.linalg.svd(r_a @ r_b.mT, full_matrices=False)
        return q_a @ u_core, s, q_b @ vh_core.mT

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
        """``V`` under TransformerLens's older name (it has always held ``V``, not ``Vᵀ``)."""
        return self.svd()[2]

    def collapse_l(self) -> Float[Tensor, "*batch k rdim"]:
        """``diag(S) @ Vh``: ``AB`` with its orthonormal left factor ``U`` dropped.

        Shares ``AB``'s Gram matrix ``(AB)ᵀ(AB)``, so ``‖AB @ Y‖_F`` equals
        ``‖collapse_l() @ Y‖_F`` for any ``Y``, with ``k`` rows instead of ``ldim``.
        """
        _, s, v = self.svd()
        return s[..., :, None] * v.mT

    def collapse_r(self) -> Float[Tensor, "*batch ldim k"]:
        """``U @ diag(S)``: ``AB`` with its orthonormal right factor ``Vh`` dropped.

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
    def __getitem__(self, index: Index | tuple[Index, ...]) -> FactoredMatrix:
        """Index leading dims (``fm[layer, head]``), then optionally rows and columns.

        Rows and columns take an int or slice and the result stays a matrix (an
        int keeps a length-1 dim). ``None`` and ``...`` are refused because
        they make it ambiguous which dims are the matrix's.
        """
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is None or i is Ellipsis for i in idx):
            raise ShapeMismatchError("FactoredMatrix indexing takes no None or ...")
        n_lead = self.ndim - 2
        if len(idx) > self.ndim:
            raise ShapeMismatchError(
                f"index of length {len(idx)} is too long for a FactoredMatrix of shape "
                f"{tuple(self.shape)}"
            )
        if len(idx) <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        lead, rest = idx[:n_lead], idx[n_lead:]
        rows = _keep_dim(rest[0])
        cols = _keep_dim(rest[1]) if len(rest) > 1 else slice(None)
        return FactoredMatrix(
            self.A[(*lead, rows, slice(None))], self.B[(*lead, slice(None), cols)]
        )

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
