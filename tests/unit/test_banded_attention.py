"""The banded Longformer computation against a per-query loop, over shapes and edge cases.

The loop writes the definition directly: a local query attends by softmax over the
real keys at most ``window`` away and every global token; a global query over every
real key, through its own projections; a padded query sees itself too (mitk's
convention: no softmax row is empty).
"""

from __future__ import annotations

import pytest
import torch

from mitk.model.banded_attention import (
    banded_attention,
    global_rows,
    global_slots,
    longformer_allowed,
    with_global_rows,
)


def _loop(q, k, v, gq, gk, gv, window, valid, glob, scale):  # type: ignore[no-untyped-def]
    b, _, n, _ = q.shape
    out = torch.zeros_like(q)
    for r in range(b):
        for i in range(n):
            if glob[r, i]:
                keys = [j for j in range(n) if valid[r, j]]
                qq, kk, vv = gq, gk, gv
            else:  # a padded query also sees itself
                seen = [bool(valid[r, j]) and (abs(i - j) <= window or bool(glob[r, j]))
                        for j in range(n)]  # fmt: skip
                keys = [j for j in range(n) if seen[j] or j == i]
                qq, kk, vv = q, k, v
            scores = (kk[r, :, keys] @ qq[r, :, i, :, None])[..., 0] * scale  # [head, keys]
            out[r, :, i] = (scores.softmax(-1)[..., None] * vv[r, :, keys]).sum(1)
    return out


@pytest.mark.parametrize(("n", "window"), [(1, 1), (3, 2), (7, 1), (16, 4), (23, 3), (9, 30)])
@pytest.mark.parametrize("globals_", [False, True])
def test_banded_equals_the_per_query_definition(n: int, window: int, globals_: bool) -> None:
    gen = torch.Generator().manual_seed(n * 31 + window)
    q, k, v, gq, gk, gv = (torch.randn(3, 2, n, 4, generator=gen, dtype=torch.float64)
                           for _ in range(6))  # fmt: skip
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, n - n // 3 :] = False  # right padding
    valid[2, : n // 2] = False  # left padding
    valid[:, 0] |= n == 1
    glob = torch.zeros(3, n, dtype=torch.bool)
    if globals_:
        glob[0, torch.randperm(n, generator=gen)[: max(1, n // 4)]] = True
        glob[2, n - 1] = True  # row 1 has none while others do
        glob &= valid
    scale = 0.5
    slots = global_slots(glob) if globals_ else None
    z = banded_attention(q, k, v, window, valid & ~glob, slots, scale)
    if slots is not None:
        z = with_global_rows(z, global_rows(gq, gk, gv, slots, valid, scale), glob, slots)
    expected = _loop(q, k, v, gq, gk, gv, window, valid, glob, scale)
    torch.testing.assert_close(z, expected, atol=1e-10, rtol=0)
    # the dense pattern the explicit path uses says the same
    allowed = longformer_allowed(n, window, valid, glob if globals_ else None, q.device)
    scores = torch.where(glob[:, None, :, None], gq @ gk.transpose(-1, -2), q @ k.transpose(-1, -2))
    pattern = (scores * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    dense = torch.where(glob[:, None, :, None], pattern @ gv, pattern @ v)
    torch.testing.assert_close(dense, expected, atol=1e-10, rtol=0)


def test_gradients_equal_the_dense_formulations() -> None:
    """Training through the banded path sees what the dense explicit path would (fp64)."""
    gen = torch.Generator().manual_seed(7)
    n, window = 19, 3
    inputs = [torch.randn(2, 2, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
              for _ in range(6)]  # fmt: skip
    q, k, v, gq, gk, gv = inputs
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 15:] = False
    glob = torch.zeros(2, n, dtype=torch.bool)
    glob[0, [1, 9]] = True
    glob[1, 14] = True
    weights = torch.randn(2, 2, n, 4, generator=gen, dtype=torch.float64)
    slots = global_slots(glob)
    z = banded_attention(q, k, v, window, valid & ~glob, slots, 0.5)
    z = with_global_rows(z, global_rows(gq, gk, gv, slots, valid, 0.5), glob, slots)
    banded = torch.autograd.grad((z * weights).sum(), inputs)
    allowed = longformer_allowed(n, window, valid, glob, q.device)
    rows = glob[:, None, :, None]
    scores = torch.where(rows, gq @ gk.transpose(-1, -2), q @ k.transpose(-1, -2)) * 0.5
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    dense = torch.where(rows, pattern @ gv, pattern @ v)
    expected = torch.autograd.grad((dense * weights).sum(), inputs)
    for got, want in zip(banded, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
