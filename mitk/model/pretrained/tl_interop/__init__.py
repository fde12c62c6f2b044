"""TransformerLens's classic ``HookedTransformer`` to a mitk model and back, same weights.

transformer-lens is imported lazily: a test dependency, not a runtime one. What
changes on the way, all exact:

- TransformerLens gives every layer every bias. A bias group (q/k/v, attention
  output, MLP, unembedding) that is exactly zero everywhere becomes no bias in
  mitk; going back, biases mitk lacks become zeros.
- Folded norms (``LNPre``/``RMSPre``, after TransformerLens's ``fold_ln``)
  become mitk norms with ``w = 1`` and ``b = 0``, recorded as ``fold_ln`` in
  ``cfg.extra["processing"]``, as mitk's ``process_weights(fold_ln=True)``
  leaves them; such a mitk model goes back as ``LNPre``/``RMSPre``.
- The tokenizer object travels along (TransformerLens's ``set_tokenizer`` may
  reload it with BOS handling of its own, as it does for any tokenizer).

Anything mitk cannot compute the same way is refused (``UnsupportedModelError``
naming the config field and its value), and every TransformerLens parameter
must find a place or be one of those all-zero biases: nothing is dropped silently.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import MitkError, UnsupportedModelError
from mitk.model.pretrained.tl_interop.config import mitk_config, tl_config_fields
from mitk.model.pretrained.tl_interop.names import (
    copy_into,
    needless,
    pre_norms,
    shared_parameters,
    tensor_at,
)


class TransformerLensNotInstalledError(MitkError, ImportError):
    """The conversion needs transformer-lens 3.x (the classic ``HookedTransformer``): missing."""


def _classic(name: str) -> Any:
    """``transformer_lens.<name>`` from 3.x, or the error saying what to install."""
    try:
        import transformer_lens

        return getattr(transformer_lens, name)
    except ImportError as err:  # not installed, or 4.x, which removed the classic classes
        raise TransformerLensNotInstalledError(
            f"converting to or from TransformerLens needs transformer-lens 3.x's classic "
            f"{name} (pip install 'transformer-lens<4'); mitk itself does not depend on "
            f"it ({err})"
        ) from err


def from_transformer_lens(model_cls: Any, tl_model: Any) -> Any:
    """A ``model_cls`` (mitk's HookedTransformer) with ``tl_model``'s config, weights and tokenizer.

    ``tl_model`` is TransformerLens's classic ``HookedTransformer``. The result
    computes the same logits and the same activation at every hook both name,
    with two exceptions by construction: ``hook_embed`` of a model normed right
    after its embedding (TransformerLens hooks after that norm, mitk before),
    and ``hook_k``/``hook_v`` under ``ungroup_grouped_query_attention`` (mitk
    keeps the key/value head count). It lives on ``tl_model``'s device, in the
    same train/eval mode.
    """
    if hasattr(tl_model, "original_model"):  # a TransformerBridge wraps a Hugging Face model
        raise UnsupportedModelError(
            f"from_transformer_lens takes the classic HookedTransformer, not a "
            f"{type(tl_model).__name__}: load the checkpoint it was booted from with "
            "HookedTransformer.from_pretrained(path) (then process_weights(...) to match "
            "enable_compatibility_mode())"
        )
    if not isinstance(tl_model, _classic("HookedTransformer")):
        raise UnsupportedModelError(
            f"from_transformer_lens takes transformer_lens.HookedTransformer, "
            f"not {type(tl_model).__name__}"
        )
    params = dict(tl_model.named_parameters())
    cfg = mitk_config(tl_model.cfg, params)
    norm_weights = tl_model.cfg.normalization_type in ("LN", "RMS")
    names = shared_parameters(
        cfg, grouped=tl_model.cfg.n_key_value_heads is not None, norm_weights=norm_weights
    )
    dropped = [n for n in params if n not in names and not needless(n, cfg)]
    if dropped:
        raise UnsupportedModelError(
            f"mitk has no place for TransformerLens parameters {dropped}; "
            "converting would drop them"
        )
    model = model_cls(cfg, tokenizer=tl_model.tokenizer, seed=None)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(math.nan)  # so that a parameter nothing was written into shows
        for tl_name, path in names.items():
            copy_into(tensor_at(model, path), params[tl_name], tl_name)
        if not norm_weights:  # folded norms: the identity, as mitk's fold_ln leaves them
            for norm in pre_norms(cfg):
                module = model.get_submodule(norm)
                module.w.fill_(1.0)
                if hasattr(module, "b"):
                    module.b.zero_()
    unset = [n for n, p in model.named_parameters() if bool(p.isnan().any())]
    if unset:
        raise UnsupportedModelError(f"nothing in the TransformerLens model gives mitk's {unset}")
    return model.to(tl_model.embed.W_E.device).train(tl_model.training)


def to_transformer_lens(model: Any) -> Any:
    """TransformerLens's ``HookedTransformer`` with ``model``'s weights and tokenizer.

    Same logits and hook activations (see ``from_transformer_lens`` for the two
    exceptions); ``from_transformer_lens`` of the result gives ``model``'s state
    back exactly, except that a bias group mitk holds but is zero everywhere
    comes back as no bias. Raises ``TransformerLensNotInstalledError`` without
    transformer-lens, and ``UnsupportedModelError`` for what TransformerLens's
    classic model cannot compute (sinusoidal positions, token types, post-norm
    blocks, latent attention, encoders without an LM head, ...).
    """
    cfg: TransformerConfig = model.cfg
    if cfg.gated_mlp and cfg.mlp_bias and cfg.has_mlp:
        nonzero = [i for i, block in enumerate(model.blocks) if bool(block.mlp.b_in.any())]
        if nonzero:
            raise UnsupportedModelError(
                f"mitk config gated_mlp=True with a non-zero blocks.{nonzero[0]}.mlp.b_in: "
                "TransformerLens adds b_in after the gate product, mitk to the linear branch"
            )
    folded = "fold_ln" in cfg.extra.get("processing", []) and all(
        _is_identity(model.get_submodule(norm)) for norm in pre_norms(cfg)
    )
    tl_cfg = _classic("HookedTransformerConfig")(
        **tl_config_fields(cfg, folded), device=str(model.W_E.device), init_weights=False
    )
    tokenizer = model.tokenizer
    side = None if tokenizer is None else getattr(tokenizer, "padding_side", None)
    tl_cls = _classic("HookedTransformer")
    tl_model = tl_cls(tl_cfg, tokenizer=tokenizer, default_padding_side=side)
    names = shared_parameters(
        cfg, grouped=tl_cfg.n_key_value_heads is not None, norm_weights=not folded
    )
    tl_params = dict(tl_model.named_parameters())
    unknown = [n for n in tl_params if n not in names and not needless(n, cfg)]
    missing = [n for n in names if n not in tl_params]
    if unknown or missing:
        raise UnsupportedModelError(
            "TransformerLens's model does not line up with mitk's: parameters only it has "
            f"{unknown}, only mitk has {missing}"
        )
    with torch.no_grad():
        for name, param in tl_params.items():
            if name in names:
                copy_into(param, tensor_at(model, names[name]), name)
            else:
                param.zero_()  # a bias mitk does not have, or a table TransformerLens never reads
    return tl_model.train(model.training)


def _is_identity(norm: nn.Module) -> bool:
    weight: Tensor = norm.get_parameter("w")
    bias = getattr(norm, "b", None)
    return bool(weight.eq(1).all()) and (bias is None or not bool(bias.any()))
