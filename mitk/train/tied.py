"""Train with the unembedding tied to the embedding (``W_U = W_E^T``); save it untied.

Why a recipe would: with one matrix for both, the identity map from a token's
embedding to its own logit is there from the first step, so copying (induction)
forms from random token sequences of the whole vocabulary in a few hundred steps;
untied, a small model learns it only for a handful of frequent tokens. mitk's
model format keeps ``W_U`` and ``W_E`` separate, so after training ``W_U`` is a
parameter again, holding ``W_E^T``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from mitk.errors import ShapeMismatchError
from mitk.model import HookedTransformer


@contextmanager
def tied_unembedding(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """Within the block, ``model.unembed.W_U`` is ``model.embed.W_E.T`` (one parameter).

    ``W_U`` leaves ``model.parameters()`` and ``state_dict()`` while tied, so an
    optimizer or checkpoint made inside the block knows only ``W_E`` (resume
    inside the block too). On exit, however it exits, ``W_U`` is an
    ``nn.Parameter`` holding a copy of ``W_E.T``. Raises ``ShapeMismatchError``
    when the two shapes do not transpose into each other (e.g. a ``d_vocab``
    padded on one side only).
    """
    embed, unembed = model.embed, model.unembed
    if tuple(unembed.W_U.shape) != tuple(embed.W_E.T.shape):
        raise ShapeMismatchError(
            f"cannot tie W_U {tuple(unembed.W_U.shape)} to W_E^T {tuple(embed.W_E.T.shape)}"
        )
    del unembed.W_U  # the parameter goes; each forward reads the embedding instead

    def read_embedding(module: nn.Module, args: object) -> None:
        # a fresh contiguous copy (autograd carries its gradient to W_E): a transposed view
        # would take the GEMM path that depends on memory alignment, and resumed runs
        # would then differ from straight ones in the last bit
        object.__setattr__(module, "W_U", embed.W_E.T.contiguous())

    handle = unembed.register_forward_pre_hook(read_embedding)
    read_embedding(unembed, ())
    try:
        yield model
    finally:
        handle.remove()
        unembed.__dict__.pop("W_U", None)
        unembed.W_U = nn.Parameter(embed.W_E.detach().T.clone())
