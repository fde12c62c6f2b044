"""Full QK and OV circuits in token space, kept factored, and the OV copying score.

The full circuits follow Elhage et al. (2021), "A Mathematical Framework for
Transformer Circuits": the direct path from token embeddings through one head
to the keys it scores (QK) or to the logits it writes (OV). Like
TransformerLens's tutorials, they use the token embedding alone: positional
embeddings, LayerNorm and biases are left out, so read them as the head's
token-to-token behaviour, not an exact forward.

Every ``[d_vocab, d_vocab]`` matrix stays factored through the head's
``d_head``, so a full circuit costs ``O(d_vocab · d_model · d_head)`` memory
per head, never ``d_vocab²``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.model.factored_matrix import FactoredMatrix
from mitk.model.transformer import HookedTransformer
from mitk.shapes import Float


def full_qk_circuit(model: HookedTransformer) -> FactoredMatrix:
    """``W_E @ W_QK @ W_Eᵀ`` per head: ``[layer, head, d_vocab, d_vocab]``, factored.

    Entry ``[l, h, i, j]`` is the (unscaled) attention score head ``l.h`` gives a
    query token ``i`` for a key token ``j`` through the direct embedding path.
    """
    qk, W_E = model.QK, model.W_E
    return FactoredMatrix(W_E @ qk.A, qk.B @ W_E.T)


def full_ov_circuit(model: HookedTransformer) -> FactoredMatrix:
    """``W_E @ W_OV @ W_U`` per head: ``[layer, head, d_vocab, d_vocab]``, factored.

    Entry ``[l, h, i, j]`` is the direct logit of token ``j`` added when head
    ``l.h`` attends (with weight one) to token ``i``.
    """
    ov = model.OV
    return FactoredMatrix(model.W_E @ ov.A, ov.B @ model.W_U)


@torch.no_grad()
def ov_copying_scores(model: HookedTransformer) -> Float[Tensor, "layer head"]:
    """Per head, how positive the full OV circuit's eigenvalues are: ``Σλ / Σ|λ|`` in ``[-1, 1]``.

    Elhage et al.'s copying score: a head that copies the token it attends
    to maps each token's embedding towards its own unembedding, so its full
    OV circuit has mostly positive eigenvalues (score near +1); an
    anti-copying head scores near -1 and a random one near 0. Exactly,
    ``score = Re(Σᵢ λᵢ) / Σᵢ |λᵢ|`` over the eigenvalues of the small
    ``d_head × d_head`` core ``W_O W_U W_E W_V`` (the full circuit's ``BA``,
    which holds its nonzero eigenvalues; imaginary parts cancel in the sum
    because complex eigenvalues of a real matrix come in conjugate pairs).
    The core is reached through ``W_U W_E`` ``[d_model, d_model]``, so no
    ``d_vocab``-sized factor is built. A head whose circuit is exactly zero
    scores NaN. The result is detached from autograd.
    """
    # OV @ (W_U W_E) is a cyclic permutation of W_E OV W_U: same BA, same nonzero eigenvalues
    eig = (model.OV @ (model.W_U @ model.W_E)).eigenvalues
    return eig.sum(-1).real / eig.abs().sum(-1)
