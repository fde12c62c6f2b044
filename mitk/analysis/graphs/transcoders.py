"""The transcoders a graph reads, checked against the model whose MLPs they replace.

Two kinds, one interface (``Dictionaries``) for the rest of the package:

- per-layer transcoders, one per layer: anything with the shape of
  ``mitk.sae.SparseAutoencoder`` built as a transcoder (``cfg.hook_name``, the
  MLP's input ``blocks.L.ln2.hook_normalized`` or ``blocks.L.hook_resid_mid``;
  ``cfg.target_hook_name``, ``blocks.L.hook_mlp_out``; ``W_enc [d_in, d_sae]``,
  ``W_dec [d_sae, d_out]``, ``encoder_bias()``, ``encode``, ``decode``, ``skip``);
- one cross-layer transcoder (``mitk.sae.CrossLayerTranscoder``'s shape): layer
  L's latents read layer L's MLP input and write every MLP output from L on.

``mitk.analysis`` does not import ``mitk.sae`` (sibling layers), hence the protocols.
A per-layer transcoder is the cross-layer case whose latents write one layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mitk.config import TORCH_DTYPES
from mitk.errors import ConfigError, ShapeMismatchError, UnsupportedModelError
from mitk.model import HookedTransformer
from mitk.shapes import Float, Int

INPUT_HOOKS = ("ln2.hook_normalized", "hook_resid_mid")
"""What layer L's transcoder may read (after ``blocks.L.``): the MLP input after or before ln2."""
OUTPUT_HOOK = "hook_mlp_out"


@runtime_checkable
class Transcoder(Protocol):
    """What a graph needs of one layer's transcoder (``mitk.sae.SparseAutoencoder`` has it)."""

    # read-only properties, so that an nn.Parameter attribute (a Tensor subclass) satisfies them
    @property
    def cfg(self) -> Any: ...

    @property
    def W_enc(self) -> Tensor: ...

    @property
    def W_dec(self) -> Tensor: ...

    def encoder_bias(self) -> Tensor: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def skip(self, x: Tensor) -> Tensor | None: ...


@runtime_checkable
class _TensorList(Protocol):
    """Tensors by index (an ``nn.ParameterList`` is one; mypy does not count it a Sequence)."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


@runtime_checkable
class CrossLayer(Protocol):
    """What a graph needs of a cross-layer transcoder (``mitk.sae.CrossLayerTranscoder`` has it)."""

    @property
    def cfg(self) -> Any: ...

    @property
    def W_enc(self) -> Tensor: ...

    @property
    def b_dec(self) -> Tensor: ...

    @property
    def W_dec(self) -> _TensorList: ...

    def pre_activations(self, layer: int, x: Tensor) -> Tensor: ...

    def encode_layer(self, layer: int, x: Tensor) -> Tensor: ...

    def decode_layer(self, layer: int, latents: Sequence[Tensor]) -> Tensor: ...


class Dictionaries(ABC):
    """A model's replacement dictionaries, per-layer or cross-layer, behind one interface.

    Layer ``L``'s latents read ``input_hook(L)``; latent ``f`` of layer ``L``
    writes layers ``L .. L + span(L) - 1`` with ``decoder_rows(L, f)[:, j]`` into
    layer ``L + j``. Build with ``dictionaries(model, transcoders)``, which checks them.
    """

    def __init__(self, n_layers: int, dtype: torch.dtype) -> None:
        self.n_layers, self.dtype = n_layers, dtype

    @abstractmethod
    def input_hook(self, layer: int) -> str:
        """The full name of the hook layer ``layer``'s latents read."""

    @abstractmethod
    def span(self, layer: int) -> int:
        """How many layers (``layer`` and those after it) layer ``layer``'s latents write."""

    @abstractmethod
    def pre_activations(
        self, layer: int, x: Float[Tensor, "*lead d_model"]
    ) -> Float[Tensor, "*lead d_sae"]:
        """``x W_enc + b``: what layer ``layer``'s activation reads (and graph edges target)."""

    @abstractmethod
    def encode(self, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_sae"]:
        """Layer ``layer``'s latent activations."""

    @abstractmethod
    def encoder_rows(self, layer: int, index: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        """The encoder directions of latents ``index`` of layer ``layer``."""

    @abstractmethod
    def decoder_rows(self, layer: int, index: Int[Tensor, " n"]) -> Float[Tensor, "n span d_model"]:
        """The decoder vectors of latents ``index`` of layer ``layer``, one per layer written."""

    @abstractmethod
    def decode(self, layer: int, latents: Sequence[Tensor]) -> Float[Tensor, "*lead d_model"]:
        """Layer ``layer``'s reconstruction (biases in, skip out) from ``latents[0..layer]``."""

    def skip_weight(self, layer: int) -> Float[Tensor, "d_model d_model"] | None:
        """A skip-transcoder's ``W_skip`` (``skip(x) = x W_skip^T``), else ``None``."""
        return None

    def skip(self, layer: int, x: Float[Tensor, "*lead d_model"]) -> Tensor | float:
        """The skip term layer ``layer`` adds to its MLP output (0.0 without one)."""
        weight = self.skip_weight(layer)
        return 0.0 if weight is None else x.to(weight.dtype) @ weight.T


TranscoderSet = Sequence[Transcoder] | Mapping[int, Transcoder] | CrossLayer | Dictionaries
"""One transcoder per layer (a list in layer order, or ``{layer: transcoder}``), one CLT,
or the ``Dictionaries`` that ``dictionaries`` built of either."""


class _PerLayer(Dictionaries):
    def __init__(self, layers: list[Transcoder]) -> None:
        super().__init__(len(layers), layers[0].W_enc.dtype)
        self.layers = layers

    def input_hook(self, layer: int) -> str:
        return str(self.layers[layer].cfg.hook_name)

    def span(self, layer: int) -> int:
        return 1

    def pre_activations(self, layer: int, x: Tensor) -> Tensor:
        transcoder = self.layers[layer]
        return x.to(transcoder.W_enc.dtype) @ transcoder.W_enc + transcoder.encoder_bias()

    def encode(self, layer: int, x: Tensor) -> Tensor:
        return self.layers[layer].encode(x)

    def encoder_rows(self, layer: int, index: Tensor) -> Tensor:
        return self.layers[layer].W_enc.detach()[:, index].T

    def decoder_rows(self, layer: int, index: Tensor) -> Tensor:
        return self.layers[layer].W_dec.detach()[index][:, None]

    def decode(self, layer: int, latents: Sequence[Tensor]) -> Tensor:
        return self.layers[layer].decode(latents[layer])

    def skip_weight(self, layer: int) -> Tensor | None:
        transcoder = self.layers[layer]
        has_skip = getattr(transcoder.cfg, "skip_connection", False)
        weight = getattr(transcoder, "W_skip", None)
        return weight.detach() if has_skip and weight is not None else None


class _CrossLayer(Dictionaries):
    def __init__(self, clt: CrossLayer) -> None:
        super().__init__(int(clt.cfg.n_layers), clt.W_enc.dtype)
        self.clt = clt

    def input_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.clt.cfg.input_hook}"

    def span(self, layer: int) -> int:
        return self.n_layers - layer

    def pre_activations(self, layer: int, x: Tensor) -> Tensor:
        return self.clt.pre_activations(layer, x)

    def encode(self, layer: int, x: Tensor) -> Tensor:
        return self.clt.encode_layer(layer, x)

    def encoder_rows(self, layer: int, index: Tensor) -> Tensor:
        return self.clt.W_enc.detach()[layer][:, index].T

    def decoder_rows(self, layer: int, index: Tensor) -> Tensor:
        return self.clt.W_dec[layer].detach()[index]

    def decode(self, layer: int, latents: Sequence[Tensor]) -> Tensor:
        return self.clt.decode_layer(layer, latents)


def dictionaries(model: HookedTransformer, transcoders: TranscoderSet) -> Dictionaries:
    """``transcoders`` checked against ``model``: one per layer, or one CLT over all layers.

    Each must read its layer's MLP input (one of ``INPUT_HOOKS``) and write its
    ``hook_mlp_out``, be ``d_model`` wide on both sides, share the model's
    dtype, and have an encoder that is affine before its activation (gated SAEs
    are refused). Errors name the layer and what does not fit.
    """
    if isinstance(transcoders, Dictionaries):
        return transcoders  # checked when it was built
    if isinstance(transcoders, Transcoder):
        raise TypeError(
            "got one transcoder; a graph needs one per layer (a list, or {layer: transcoder})"
        )
    if isinstance(transcoders, CrossLayer):
        _check_model(model)
        _check_cross_layer(model, transcoders)
        return _CrossLayer(transcoders)
    return _PerLayer(per_layer(model, transcoders))


def per_layer(
    model: HookedTransformer, transcoders: Sequence[Transcoder] | Mapping[int, Transcoder]
) -> list[Transcoder]:
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


def _check_cross_layer(model: HookedTransformer, clt: CrossLayer) -> None:
    cfg = clt.cfg
    where = "the cross-layer transcoder"
    if cfg.n_layers != model.cfg.n_layers:
        raise ConfigError(
            f"{where} spans {cfg.n_layers} layers; the model has {model.cfg.n_layers}"
        )
    if cfg.input_hook not in INPUT_HOOKS:
        raise ConfigError(
            f"{where} reads {cfg.input_hook!r}; it must read one of {list(INPUT_HOOKS)}"
        )
    d_model = model.cfg.d_model
    if cfg.d_model != d_model:
        raise ShapeMismatchError(f"{where} is {cfg.d_model} wide; the model's d_model is {d_model}")
    dtype = TORCH_DTYPES[model.cfg.dtype]
    if clt.W_enc.dtype != dtype:
        raise ConfigError(
            f"{where} has {clt.W_enc.dtype} weights, the model {dtype}: "
            "convert one so that the error terms are exact"
        )
