"""Sparse Transformer attention patterns (Child et al. 2019) as boolean masks.

Both are unions of the paper's two head types, applied to every head, on top of the
causal mask (which the caller adds):

- ``strided`` (stride ``l``): key ``j`` is visible from query ``i`` when it is one
  of the last ``l`` positions (``i - j < l``) or a multiple of ``l`` back
  (``(i - j) mod l == 0``);
- ``fixed`` (block ``l``, summary ``c``): when it is in the query's block
  (``floor(i / l) == floor(j / l)``) or among the last ``c`` positions of its own
  block (``j mod l >= l - c``), the "summary" cells every later query reads.

Positions count sequence slots (queries are the last ``q_len`` of ``k_len``), as the
sliding window does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.config import SparsePattern
from mitk.shapes import Bool


def sparse_allowed(
    kind: SparsePattern, block: int, summary: int, q_len: int, k_len: int, device: torch.device
) -> Bool[Tensor, "q k"]:
    """``[q, k]``: where query ``i`` (one of the last ``q_len``) may see key ``j``."""
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    if kind == "strided":
        return ((i - j) < block) | ((i - j) % block == 0)
    if kind == "fixed":
        return (i // block == j // block) | (j % block >= block - summary)
    raise ValueError(f"no sparse pattern {kind!r}")
