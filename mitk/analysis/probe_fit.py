"""Linear probes for many layers at once: closed-form ridge, batched Newton and L-BFGS, ROC-AUC.

Every function takes standardised features shared by a group axis
(``z [group, row, feature]``, one group per layer) and several label sets per
group (``y [group, variant, row]``: the probe and its controls), and solves all
``group × variant`` problems together: one linear solve, or one optimisation
whose loss is their sum (independent problems, so the joint minimum is each
problem's minimum). Nothing loops over layers in Python.

Objectives (``n`` training rows, ``w`` the weights, the bias unpenalised):
ridge ``mean((t - z·w - b)²) + l2·|w|²`` with targets ``t = ±1``; logistic
``mean(log(1 + exp(-t·(z·w + b)))) + l2/2·|w|²``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.shapes import Bool, Float

Solver = Literal["auto", "newton", "lbfgs"]
NEWTON_MAX_FEATURES = 512  # above this, a Hessian per problem costs more than L-BFGS's steps
CHUNK_ELEMENTS = 1 << 26  # elements of one intermediate (the Hessians, or a block of rows of them)


def _scores(
    z: Float[Tensor, "group row feature"],
    w: Float[Tensor, "group variant feature"],
    b: Float[Tensor, "group variant"],
) -> Float[Tensor, "group variant row"]:
    return (w @ z.transpose(1, 2)) + b[..., None]


def fit_ridge(
    z: Float[Tensor, "group row feature"],
    y: Bool[Tensor, "group variant row"],
    l2: float,
) -> tuple[Float[Tensor, "group variant feature"], Float[Tensor, "group variant"]]:
    """Ridge regression on ``±1`` targets, closed form; ``z`` must be centred (per feature).

    Solves in the primal (``feature × feature``) or the dual (``row × row``),
    whichever system is smaller; both give the same weights.
    """
    n, f = z.shape[1], z.shape[2]
    t = y.to(z.dtype) * 2 - 1
    bias = t.mean(-1)
    t = t - bias[..., None]
    if f <= n:
        gram = z.transpose(1, 2) @ z + n * l2 * torch.eye(f, dtype=z.dtype, device=z.device)
        w = torch.linalg.solve(gram, z.transpose(1, 2) @ t.transpose(1, 2)).transpose(1, 2)
    else:
        gram = z @ z.transpose(1, 2) + n * l2 * torch.eye(n, dtype=z.dtype, device=z.device)
        alpha = torch.linalg.solve(gram, t.transpose(1, 2))  # [group, row, variant]
        w = (z.transpose(1, 2) @ alpha).transpose(1, 2)
    return w, bias


def _logistic_loss(
    z: Float[Tensor, "group row feature"],
    t: Float[Tensor, "group variant row"],
    w: Float[Tensor, "group variant feature"],
    b: Float[Tensor, "group variant"],
    l2: float,
) -> Float[Tensor, "group variant"]:
    """Each problem's objective (``t`` in {0, 1})."""
    s = _scores(z, w, b)
    loss = F.binary_cross_entropy_with_logits(s, t, reduction="none").mean(-1)
    return loss + 0.5 * l2 * (w * w).sum(-1)


def fit_logistic_newton(
    z: Float[Tensor, "group row feature"],
    y: Bool[Tensor, "group variant row"],
    l2: float,
    max_iter: int = 50,
    tol: float = 1e-6,
) -> tuple[Float[Tensor, "group variant feature"], Float[Tensor, "group variant"]]:
    """L2-penalised logistic regression by Newton's method, every problem in one batched solve.

    Each step solves ``[feature + 1]²`` systems for all problems at once and is
    halved (per problem) while it would raise that problem's loss, so the loss
    never goes up. Stops when every step is below ``tol`` or after ``max_iter``.
    """
    g, n, f = z.shape
    v = y.shape[1]
    t = y.to(z.dtype)
    za = torch.cat([z, torch.ones(g, n, 1, dtype=z.dtype, device=z.device)], -1)
    theta = torch.zeros(g, v, f + 1, dtype=z.dtype, device=z.device)
    penalty = torch.full((f + 1,), l2, dtype=z.dtype, device=z.device)
    penalty[-1] = 0.0  # the bias is not penalised

    def loss_of(theta: Tensor) -> Tensor:
        return _logistic_loss(z, t, theta[..., :f], theta[..., f], l2)

    loss = loss_of(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(theta @ za.transpose(1, 2))  # [group, variant, row]
        grad = ((p - t) @ za) / n + penalty * theta
        weight = p * (1 - p) / n
        hess = torch.diag(penalty).expand(g, v, f + 1, f + 1).clone()
        rows = max(1, CHUNK_ELEMENTS // (g * v * (f + 1)))
        for start in range(0, n, rows):  # the [.., row, feature] product, a block of rows at a time
            block = za[:, start : start + rows]
            scaled = block[:, None] * weight[..., start : start + rows, None]
            hess += scaled.transpose(-1, -2) @ block[:, None]
        hess = hess + 1e-10 * torch.eye(f + 1, dtype=z.dtype, device=z.device)
        step = torch.linalg.solve(hess, grad[..., None])[..., 0]
        size = torch.ones(g, v, 1, dtype=z.dtype, device=z.device)
        for _ in range(30):  # backtrack problems whose loss would rise
            trial = loss_of(theta - size * step)
            worse = trial > loss + 1e-12 * loss.abs()
            if not bool(worse.any()):
                break
            size = torch.where(worse[..., None], size / 2, size)
        theta = theta - size * step
        loss = loss_of(theta)
        if float((size * step).abs().max()) < tol:
            break
    return theta[..., :f], theta[..., f]


def fit_logistic_lbfgs(
    z: Float[Tensor, "group row feature"],
    y: Bool[Tensor, "group variant row"],
    l2: float,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> tuple[Float[Tensor, "group variant feature"], Float[Tensor, "group variant"]]:
    """The same objective by L-BFGS on the sum of every problem's loss (strong Wolfe search).

    Memory grows with ``group × variant × feature`` only, so it suits wide
    activations (``feature`` in the thousands) where Newton's Hessians do not fit.
    """
    g, _, f = z.shape
    v = y.shape[1]
    t = y.to(z.dtype)
    w = torch.zeros(g, v, f, dtype=z.dtype, device=z.device, requires_grad=True)
    b = torch.zeros(g, v, dtype=z.dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _logistic_loss(z, t, w, b, l2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def fit_logistic(
    z: Float[Tensor, "group row feature"],
    y: Bool[Tensor, "group variant row"],
    l2: float,
    solver: str = "auto",
    max_iter: int | None = None,
) -> tuple[Float[Tensor, "group variant feature"], Float[Tensor, "group variant"]]:
    """Logistic probes by Newton (``"auto"``: up to 512 features, Hessians within 2**26 numbers)
    or L-BFGS (wider).

    ``solver`` is a ``Solver``, typed ``str`` because it comes from users: an
    unknown one is a ``ValueError`` naming the choices.
    """
    if solver not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', not {solver!r}")
    if l2 <= 0:
        raise ValueError(f"logistic probes need l2 > 0 (separable data has no optimum), got {l2}")
    g, f, v = z.shape[0], z.shape[2], y.shape[1]
    small = f <= NEWTON_MAX_FEATURES and g * v * (f + 1) ** 2 <= CHUNK_ELEMENTS
    newton = solver == "newton" or (solver == "auto" and small)
    if newton:
        return fit_logistic_newton(z, y, l2, **({} if max_iter is None else {"max_iter": max_iter}))
    return fit_logistic_lbfgs(z, y, l2, **({} if max_iter is None else {"max_iter": max_iter}))


def roc_auc(
    scores: Float[Tensor, "*batch row"], labels: Bool[Tensor, "*batch row"]
) -> Float[Tensor, "*batch"]:
    """Area under the ROC curve per leading index (Mann–Whitney U, ties counted as half).

    NaN where the labels hold only one class. Batched: one sort for every row set.
    """
    ordered = scores.sort(-1).values.contiguous()
    scores = scores.contiguous()
    below = torch.searchsorted(ordered, scores, side="left")
    upto = torch.searchsorted(ordered, scores, side="right")
    ranks = (below + upto + 1).to(torch.float64) / 2  # 1-based average rank within ties
    positive = labels.to(torch.float64)
    n_pos = positive.sum(-1)
    n_neg = labels.shape[-1] - n_pos
    u = (ranks * positive).sum(-1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
