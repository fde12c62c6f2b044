"""The per-layer transcoders a graph reads, checked against the model they replace MLPs of.

``mitk.analysis`` does not import ``mitk.sae`` (sibling layers), so a transcoder
is anything with the shape of ``mitk.sae.SparseAutoencoder`` built as a
transcoder: ``cfg.hook_name`` (the MLP's input, ``blocks.L.ln2.hook_normalized``
or ``blocks.L.hook_resid_mid``), ``cfg.target_hook_name`` (``blocks.L.hook_mlp_out``),
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``encoder_bias()``, ``encode``,
``decode`` and ``skip``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from mitk.config import TORCH_DTYPES
from mitk.errors import ConfigError, ShapeMismatchError, UnsupportedModelError
from mitk.model import HookedTransformer
from mitk.shapes import Float

INPUT_HOOKS = ("ln2.hook_normalized", "hook_resid_mid")
"""What layer L's transcoder may read (after ``blocks.L.``): the MLP input after or before ln2."""
OUTPUT_HOOK = "hook_mlp_out"


@runtime_checkable
class Transcoder(Protocol):
    """What a graph needs of one layer's transcoder (``mitk.sae.SparseAutoencoder`` has it)."""

    cfg: Any
    W_enc: Tensor
    W_dec: Tensor

    def encoder_bias(self) -> Tensor: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def skip(self, x: Tensor) -> Tensor | None: ...


TranscoderSet = Sequence[Transcoder] | Mapping[int, Transcoder]
"""One transcoder per layer: a list in layer order, or a mapping from layer to transcoder."""


def per_layer(model: HookedTransformer, transcoders: TranscoderSet) -> list[Transcoder]:
    """The transcoders in layer order, or an error naming what does not fit the model.

    Every layer needs one; each must read that layer's MLP input (one of
    ``INPUT_HOOKS``) and write its ``hook_mlp_out``, be ``d_model`` wide on both
    sides, and have an encoder that is affine before its activation (gated SAEs
    are refused).
    """
    _check_model(model)
    n_layers = model.cfg.n_layers
    if isinstance(transcoders, Mapping):
        by_layer = dict(transcoders)
    else:
        by_layer = dict(enumerate(transcoders))
    missing = [layer for layer in range(n_layers) if layer not in by_layer]
    extra = sorted(set(by_layer) - set(range(n_layers)))
    if missing or extra:
        parts = [f"no transcoder for layers {missing}"] if missing else []
        parts += [f"transcoders for layers {extra} that do not exist"] if extra else []
        raise ConfigError(f"{'; '.join(parts)} (the model has {n_layers} layers)")
    ordered = [by_layer[layer] for layer in range(n_layers)]
    for layer, transcoder in enumerate(ordered):
        _check_one(model, layer, transcoder)
    return ordered


def input_hook(transcoder: Transcoder) -> str:
    """The hook a transcoder reads (already checked by ``per_layer``)."""
    return str(transcoder.cfg.hook_name)


def pre_activations(
    transcoder: Transcoder, x: Float[Tensor, "*lead d_in"]
) -> Float[Tensor, "*lead d_sae"]:
    """``x W_enc + encoder_bias``: what the activation function reads (and graph edges target)."""
    return x.to(transcoder.W_enc.dtype) @ transcoder.W_enc + transcoder.encoder_bias()


def _check_model(model: HookedTransformer) -> None:
    cfg = model.cfg
    if cfg.norm_position == "post":
        raise UnsupportedModelError(
            "attribution graphs need a pre-norm model; this one is post-norm"
        )
    if not cfg.has_mlp:
        raise UnsupportedModelError("attribution graphs replace MLPs; this model has none")
    if not cfg.has_lm_head:
        raise UnsupportedModelError("attribution graphs target logits; this model has no LM head")


def _check_one(model: HookedTransformer, layer: int, transcoder: object) -> None:
    where = f"the transcoder for layer {layer}"
    if not isinstance(transcoder, Transcoder):
        raise TypeError(
            f"{where} is a {type(transcoder).__name__}; it needs cfg, W_enc, W_dec, "
            "encoder_bias, encode, decode and skip (as mitk.sae.SparseAutoencoder has)"
        )
    cfg = transcoder.cfg
    reads, writes = getattr(cfg, "hook_name", ""), getattr(cfg, "target_hook_name", "")
    allowed = [f"blocks.{layer}.{hook}" for hook in INPUT_HOOKS]
    if reads not in allowed:
        raise ConfigError(f"{where} reads {reads!r}; it must read one of {allowed}")
    if writes != f"blocks.{layer}.{OUTPUT_HOOK}":
        raise ConfigError(
            f"{where} writes {writes!r}; it must write 'blocks.{layer}.{OUTPUT_HOOK}'"
        )
    if getattr(cfg, "architecture", None) == "gated":
        raise UnsupportedModelError(
            f"{where} is gated: its activation is not a function of one affine pre-activation"
        )
    d_model = model.cfg.d_model
    d_in, d_sae = transcoder.W_enc.shape
    if d_in != d_model or transcoder.W_dec.shape != (d_sae, d_model):
        raise ShapeMismatchError(
            f"{where} maps width {d_in} to {transcoder.W_dec.shape[-1]} "
            f"(W_enc {tuple(transcoder.W_enc.shape)}, W_dec {tuple(transcoder.W_dec.shape)}); "
            f"the model's MLP maps d_model={d_model} to d_model={d_model}"
        )
    dtype = TORCH_DTYPES[model.cfg.dtype]
    if transcoder.W_enc.dtype != dtype or transcoder.W_dec.dtype != dtype:
        raise ConfigError(
            f"{where} has {transcoder.W_enc.dtype} weights, the model {dtype}: "
            "convert one so that the error terms are exact"
        )
