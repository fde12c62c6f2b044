"""Q-, K- and V-composition scores between attention heads, and a random-matrix baseline.

Elhage et al. (2021) score how much a later head reads what an earlier head
writes by the relative Frobenius norm of the product of their matrices. In
the row-vector convention (``x @ W``) used here and in TransformerLens, a
writer head adds ``x @ W_OV`` to the residual stream, so with reader matrix
``R``::

    score = ‖W_OV_writer @ R‖_F / (‖W_OV_writer‖_F · ‖R‖_F)

where ``R`` is the reader's ``W_QK`` (Q-composition: the writer feeds the
reader's queries), ``W_QKᵀ`` (K-composition: its keys) or ``W_OV``
(V-composition: its values). These are exactly the matrices and the order
TransformerLens's ``all_composition_scores`` uses. Norms between the heads
(LayerNorm scales and weights) are ignored, as there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mitk.errors import ConfigError
from mitk.model.factored_matrix import FactoredMatrix
from mitk.model.transformer import HookedTransformer
from mitk.shapes import Float

KINDS = ("Q", "K", "V")
_BASELINE_CHUNK = 64  # random pairs drawn at once: bounds memory on wide models


class CompositionBaseline(NamedTuple):
    """Mean and standard deviation of the composition score of random head pairs."""

    mean: float
    std: float


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"composition kind must be one of {KINDS}, got {kind!r}")


def _reader_circuit(model: HookedTransformer, kind: str) -> FactoredMatrix:
    _check_kind(kind)
    if kind == "Q":
        return model.QK
    if kind == "K":
        return model.QK.T
    return model.OV


@torch.no_grad()
def composition_scores(
    model: HookedTransformer, kind: str
) -> Float[Tensor, "layer head layer head"]:
    """Composition score of every writer head → reader head pair: ``[layer, head, layer, head]``.

    ``kind`` is ``"Q"``, ``"K"`` or ``"V"`` (anything else raises ``ConfigError``).
    Scores lie in ``[0, 1]`` and are zero wherever the reader's layer is not
    after the writer's. A head with all-zero weights scores NaN. Grouped-query
    models are scored per query head (key/value heads repeated, as in ``model.QK``).

    Only the factors are touched: ``‖W_OV @ R‖`` equals ``‖collapse_l(W_OV) @
    collapse_r(R)‖`` (orthonormal SVD factors dropped), a ``d_head × d_head``
    product per pair, batched over all writers of one reader layer. The
    result is detached from autograd.
    """
    reader_fm = _reader_circuit(model, kind)
    writer = model.OV.collapse_l()  # [layer, head, k, d_model]
    reader = reader_fm.collapse_r()  # [layer, head, d_model, k]
    n_layers, n_heads, k_w, d_model = writer.shape
    k_r = reader.shape[-1]
    writer_norm = torch.linalg.matrix_norm(writer)
    reader_norm = torch.linalg.matrix_norm(reader)
    scores = writer.new_zeros(n_layers, n_heads, n_layers, n_heads)
    for layer in range(1, n_layers):
        rows = writer[:layer].reshape(layer * n_heads * k_w, d_model)
        cols = reader[layer].permute(1, 0, 2).reshape(d_model, n_heads * k_r)
        block = (rows @ cols).view(layer, n_heads, k_w, n_heads, k_r)
        products = block.pow(2).sum((2, 4)).sqrt()  # [writer_layer, writer_head, reader_head]
        scores[:layer, :, layer] = products / (
            writer_norm[:layer, :, None] * reader_norm[layer][None, None, :]
        )
    return scores


@torch.no_grad()
def composition_baseline(
    model: HookedTransformer, kind: str, samples: int = 256, seed: int = 0
) -> CompositionBaseline:
    """Mean and std of the composition score between random matrices of this model's head shapes.

    Each sample draws a writer ``W_V W_O`` and a reader (``W_Q W_Kᵀ`` or
    ``W_V W_O``) whose factors ``[d_model, d_head]`` and ``[d_head, d_model]``
    have i.i.d. standard-normal entries (CPU generator seeded with ``seed``,
    float32). The score ignores the scale of either matrix, so matching the
    model's Frobenius norms would change nothing; and since every kind
    multiplies factors of the same shapes, the baseline is the same for
    ``"Q"``, ``"K"`` and ``"V"`` (``kind`` is still validated). Read a score
    against it as ``(score - mean) / std``.
    """
    _check_kind(kind)
    if samples < 2:
        raise ConfigError(f"samples must be at least 2 to estimate a std, got {samples}")
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for start in range(0, samples, _BASELINE_CHUNK):
        n = min(_BASELINE_CHUNK, samples - start)
        tall, wide = (n, d_model, d_head), (n, d_head, d_model)
        writer = FactoredMatrix(torch.randn(tall, generator=gen), torch.randn(wide, generator=gen))
        reader = FactoredMatrix(torch.randn(tall, generator=gen), torch.randn(wide, generator=gen))
        scores.append((writer @ reader).norm() / (writer.norm() * reader.norm()))
    all_scores = torch.cat(scores)
    return CompositionBaseline(float(all_scores.mean()), float(all_scores.std()))
