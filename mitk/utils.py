"""TransformerLens's ``utils`` names, for notebooks that ``from mitk import utils``.

The one ``utils`` module mitk has (DESIGN.md): helpers a TransformerLens user
reaches for by this name, each behaving as TransformerLens's does.

- ``get_act_name("k6a")`` → ``"blocks.6.attn.hook_k"``: TransformerLens's short
  names and aliases, spelled through ``mitk.hooks.name`` (one naming table) and
  validated: a name no model has raises ``UnknownHookError`` with suggestions.
- ``Slice``: a position selection (``None``, an int, a ``(start, stop[, step])``
  tuple, a slice, or a list/tensor/array of indices) applied along one dim.
- ``to_numpy`` and ``lm_cross_entropy_loss``.

``test_prompt`` is not here: it prints through a model's tokenizer, so it belongs
with the model. Differences from TransformerLens: ``get_act_name`` refuses what
it would turn into a name no model has (``"resid_pre"`` without a layer,
``("resid_pre", 3, "attn")``, a string layer that contradicts ``layer=``) and
reads ``"k06"`` as layer 6; ``Slice`` refuses a bare ``True``/``False``.
"""

from __future__ import annotations

import builtins
from string import ascii_lowercase, digits
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor
import torch.nn.functional as F

from mitk.errors import ShapeMismatchError, UnknownHookError
from mitk.hooks import HookKind
from mitk.hooks import name as hook_name
from mitk.hooks.names import NORMS
from mitk.shapes import Bool, Float, Int

__all__ = ["Slice", "SliceInput", "get_act_name", "lm_cross_entropy_loss", "to_numpy"]

# --- activation names --------------------------------------------------------------------
_KIND_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
"""TransformerLens's aliases for hook kinds."""

_SUBLAYER_ALIASES = {
    "a": "attn",
    "attention": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
}
"""TransformerLens's ``layer_type`` spellings: ``""`` is the block itself (``blocks.L.hook_x``)."""


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """The hook name TransformerLens's ``utils.get_act_name`` gives for a short name.

    ``name`` is a kind (``"resid_pre"``, ``"k"``, ``"scale"``), an alias
    (``"attn"`` is the pattern, ``"key"``/``"query"``/``"value"``,
    ``"attn_logits"``, ``"mlp_pre"``/``"mlp_post"``), or a kind with its layer and
    sublayer run together (``"k6"``, ``"k6a"``, ``"scale4ln1"``, ``"pre5"``).
    ``layer_type`` picks the sublayer: ``"ln1"``/``"ln2"`` for ``scale`` and
    ``normalized`` (without a layer they mean ``ln_final``), ``"a"``/``"attn"``/
    ``"attention"``, ``"m"``/``"mlp"``, ``"b"``/``"block"`` for the block itself;
    attention and MLP kinds know their sublayer, and (as in TransformerLens)
    ignore it. A full name (with a dot, or starting ``hook_``) given alone comes
    back unchanged: the model that receives it validates it.

    Raises ``UnknownHookError`` (with "did you mean" suggestions) for a kind or
    kind/sublayer pair no model has, and ``ValueError`` for a missing, negative,
    superfluous or contradictory layer.
    """
    if layer is None and layer_type is None and ("." in name or name.startswith("hook_")):
        return name
    kind, short_layer, short_sublayer = _split_short_name(name)
    if short_layer is not None and layer is not None and _digits_read(layer) != short_layer:
        raise ValueError(f"{name!r} says layer {short_layer} but layer={layer!r} was passed")
    if short_sublayer is not None and layer_type not in (None, short_sublayer):
        raise ValueError(
            f"{name!r} says layer_type {short_sublayer!r} but layer_type={layer_type!r} was passed"
        )
    layer = short_layer if short_layer is not None else _layer_number(layer)
    sublayer = short_sublayer if short_sublayer is not None else layer_type
    kind = _KIND_ALIASES.get(kind, kind)
    where = _SUBLAYER_ALIASES.get(sublayer, sublayer) if sublayer is not None else None
    if kind not in get_args(HookKind):
        raise UnknownHookError(kind, [*get_args(HookKind), *_KIND_ALIASES], what="activation kind")
    if layer is None and where:
        raise UnknownHookError(_spelled(kind, layer, where), _names_at(None))
    norm = where if kind in _NORM_KINDS and where in NORMS else None
    if layer is not None and kind in _NORM_KINDS and where is not None and norm is None:
        raise UnknownHookError(_spelled(kind, layer, where), _names_at(layer))
    full = hook_name(kind, layer, norm)
    parts = full.split(".")
    placed = parts[2] if layer is not None and len(parts) == 4 else ""
    if where is not None and placed not in ("attn", "mlp") and where != placed:
        raise UnknownHookError(_spelled(kind, layer, where), _names_at(layer))
    return full


_NORM_KINDS = ("scale", "normalized")


def _split_short_name(name: str) -> tuple[str, int | None, str | None]:
    """``"scale4ln1"`` as ``("scale", 4, "ln1")``: lowercase letters, digits, the rest."""
    letters = len(name) - len(name.lstrip(ascii_lowercase))
    end = letters
    while end < len(name) and name[end] in digits:
        end += 1
    if letters == 0 or end == letters:
        return name, None, None
    return name[:letters], int(name[letters:end]), name[end:] or None


def _digits_read(layer: int | str) -> int | str:
    """A layer given as a string of digits (TransformerLens allows ``"6"``) as an int."""
    return int(layer) if isinstance(layer, str) and layer.isascii() and layer.isdigit() else layer


def _layer_number(layer: int | str | None) -> int | None:
    if layer is None:
        return None
    layer = _digits_read(layer)
    if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
        return layer
    raise ValueError(
        f"layer must be a block index >= 0, got {layer!r}; for layers counted from the end, "
        "index the cache (cache['resid_post', -1]) or use model.cfg.n_layers"
    )


def _spelled(kind: str, layer: int | None, where: str) -> str:
    """How TransformerLens would spell a combination no model has (for the error message)."""
    prefix = f"blocks.{layer}." if layer is not None else "ln_final." if kind in _NORM_KINDS else ""
    return f"{prefix}{where}.hook_{kind}"


def _names_at(layer: int | None) -> list[str]:
    """Every name ``mitk.hooks.name`` spells at ``layer`` (model-level ones when None)."""
    names = []
    for kind in get_args(HookKind):
        for norm in (None, *NORMS):
            try:
                names.append(hook_name(kind, layer, norm))
            except ValueError:
                continue
    return list(dict.fromkeys(names))


# --- positions ---------------------------------------------------------------------------
SliceInput = (
    int | tuple[int] | tuple[int, int] | tuple[int, int, int] | list[int] | Tensor | np.ndarray
)
"""What ``Slice`` takes (or ``None``, or a ``slice``)."""


def _as_int(value: object) -> int | None:
    """An int for ints, numpy ints and 0-d integer tensors/arrays; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, Tensor) and value.ndim == 0:
        dtype = value.dtype
        if not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
            return int(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        return int(value.item())
    return None


class Slice:
    """A selection along one dim, as TransformerLens's ``utils.Slice``.

    ``mode`` says which of four it is: ``"identity"`` (``None``: everything),
    ``"int"`` (one position; the dim goes away), ``"slice"`` (a ``slice``, or a
    tuple read as ``slice(*tuple)``: ``(5,)`` is ``:5``, ``(1, 5, 2)`` is
    ``1:5:2``) or ``"array"`` (a list, tensor or array of indices, or a bool mask).
    """

    slice: int | builtins.slice | np.ndarray
    mode: Literal["identity", "int", "slice", "array"]

    def __init__(self, input_slice: SliceInput | builtins.slice | None = None) -> None:
        as_int = _as_int(input_slice)
        if input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        elif as_int is not None:
            self.slice, self.mode = as_int, "int"
        elif isinstance(input_slice, tuple) and 1 <= len(input_slice) <= 3:
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, list | Tensor | np.ndarray):
            array = to_numpy(input_slice)
            self.slice, self.mode = array if array.size else array.astype(np.int64), "array"
        else:
            raise ValueError(
                f"cannot make a Slice from {input_slice!r}: give None, an int, a (start, stop"
                "[, step]) tuple, a slice, or a list, tensor or array of indices"
            )

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """``tensor`` with this selection applied along ``dim`` (negative counts from the end)."""
        index: list[object] = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]  # type: ignore[index]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The positions selected from a dim of length ``max_ctx`` (an int needs no length)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice({self.slice!r}, mode={self.mode!r})"

    @classmethod
    def unwrap(cls, slice_input: Slice | SliceInput | builtins.slice | None) -> Slice:
        """``slice_input`` as a Slice; an int becomes ``[int]`` so the dim is kept."""
        if isinstance(slice_input, Slice):
            return slice_input
        as_int = _as_int(slice_input)
        return cls([as_int]) if as_int is not None else cls(slice_input)


# --- tensors -----------------------------------------------------------------------------
def to_numpy(tensor: object) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU; bfloat16 as float32), list or number."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, list | tuple | int | float | bool | str):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, "*loss_shape"]:
    """Next-token cross-entropy: position ``i`` predicting ``tokens[:, i + 1]``.

    ``per_token=True`` gives the loss at each predicting position
    ``[batch, pos - 1]`` (0 where ``attention_mask`` marks either token as
    padding); otherwise its mean over the pairs that count. The log-softmax runs
    in the logits' dtype, as TransformerLens's does.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    losses = -log_probs[..., :-1, :].gather(-1, tokens[..., 1:, None])[..., 0]
    if attention_mask is None:
        return losses if per_token else losses.mean()
    if attention_mask.shape != tokens.shape:
        raise ShapeMismatchError(
            "attention_mask must have the same shape as tokens, "
            f"got {tuple(attention_mask.shape)} and {tuple(tokens.shape)}"
        )
    mask = attention_mask.bool()
    pairs = mask[:, :-1] & mask[:, 1:]
    losses = losses.masked_fill(~pairs, 0.0)
    return losses if per_token else losses.sum() / pairs.sum()
