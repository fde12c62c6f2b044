"""Weight processing: rewrite weights so hook values read more cleanly, outputs unchanged.

Five opt-in transformations, each exact up to float rounding (log-probs within
1e-4 of the unprocessed model) and each idempotent, so applying one twice is
harmless. They follow TransformerLens's definitions, with one difference: a
transformation that is not valid for a model is refused (``UnsupportedModelError``)
instead of silently skipped.

Design note: folded norms keep their ``w``/``b`` parameters, set to the identity
(ones and zeros), rather than being swapped for a weightless module. The forward
and hook names stay the same, every reader of ``norm.w``/``norm.b`` (direct logit
attribution, ``apply_ln_to_stack``, SAE logit effects) stays exact without a
special case, and a processed model saves and loads with the ordinary state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mitk.errors import UnsupportedModelError
from mitk.model.factored_matrix import FactoredMatrix
from mitk.model.moe import MixtureOfExperts
from mitk.model.norms import LayerNorm, RMSNorm
from mitk.shapes import Float

STEPS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)
"""Transformation names, in the order ``process_weights`` applies them (TransformerLens's)."""


def process_weights(
    model: Any,
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    refactor_factored_attn_matrices: bool = False,
) -> Any:
    """Rewrite ``model``'s weights in place (opt-in, per step) keeping log-probs; returns it.

    Each step keeps log-probs within 1e-4, is idempotent, matches
    TransformerLens's processing, and is recorded in
    ``cfg.extra["processing"]`` (kept by ``save``). What changes for hooks:

    - ``fold_ln``: each norm's ``w`` (and LayerNorm's ``b``) is folded into
      the layers reading it (``W_qkv``/``b_qkv``, ``W_in``/``W_gate``/``b_in``,
      ``W_U``/``b_U``; missing biases are created); the norm keeps ``w=1``,
      ``b=0``. LayerNorm readers are also centred over ``d_model``. Hook
      values are unchanged (``hook_normalized`` is already taken before
      ``w`` and ``b``) except ``unembed.hook_in``, the final norm's output
      (now without ``w`` and ``b``, as in TransformerLens); weights and
      ``W_U`` now include the norm, and ``ln_final.b``'s share of a logit
      moves into ``b_U`` (DLA stays exact). RMSNorm: the weight only.
    - ``center_writing_weights``: ``W_E``, ``W_pos``, ``W_O``, ``b_O``,
      ``W_out``, ``b_out`` lose their mean over ``d_model``, so
      ``hook_embed``, ``hook_pos_embed``, ``hook_attn_out``, ``hook_mlp_out``,
      ``hook_resid_*`` and per-head/neuron writes become mean-free; norm
      hooks, q/k/v/z, patterns and neurons are unchanged (fixed sinusoidal
      positions are not weights and keep their mean). LayerNorm models
      only: refused (``UnsupportedModelError``) on RMSNorm, where the mean matters.
    - ``center_unembed``: ``W_U`` and ``b_U`` lose their mean over the
      vocabulary; logits shift by a per-position constant, log-probs do not.
    - ``fold_value_biases``: ``b_V`` moves through ``W_O`` into ``b_O``
      (patterns sum to 1); ``hook_v`` and ``hook_z`` lose the bias, per-head
      results lose ``b_V @ W_O`` (now in the layer's bias), ``hook_attn_out`` is
      unchanged.
    - ``refactor_factored_attn_matrices``: each head's ``W_Q``/``W_K`` (with
      ``b_Q``/``b_K``) become the balanced SVD factors of its QK matrix and
      ``W_V``/``W_O`` the factors ``U S``/``Vᵀ`` of its OV matrix, after
      folding ``b_V`` into ``b_O`` (TransformerLens's algorithm; singular
      directions signed so the largest entry of each ``W_Q``/``W_V`` column
      is positive). Scores, patterns and head outputs are unchanged;
      ``hook_q``/``hook_k``/``hook_v``/``hook_z`` change basis. Refused on
      rotary models (as TransformerLens does) and grouped-query attention.

    Validity is checked for every requested step before any weight changes, so
    a refused step leaves the model untouched. ``from_pretrained(...,
    fold_ln=True, ...)`` applies the same steps after loading.
    """
    flags = (
        fold_ln,
        center_writing_weights,
        center_unembed,
        fold_value_biases,
        refactor_factored_attn_matrices,
    )
    asked = dict(zip(STEPS, flags, strict=True))
    if not any(flags):
        return model  # nothing asked: not even the record changes
    if model.cfg.attention_type == "mla":
        # every step rewrites W_qkv/W_O, which latent attention does not have
        raise UnsupportedModelError("weight processing does not support latent attention (MLA)")
    rewriting_qkv = [s for s in STEPS if asked[s] and s not in ("center_writing_weights",
                                                                  "center_unembed")]  # fmt: skip
    if model.cfg.longformer is not None and rewriting_qkv:
        # these rewrite W_qkv (ln1's weight, b_V, the QK basis) but not W_qkv_global, which
        # reads ln1 too and mixes the global rows' values
        raise UnsupportedModelError(
            f"{', '.join(rewriting_qkv)} would rewrite the local projections but not "
            "Longformer's global ones (W_qkv_global); centring steps are supported"
        )
    if model.cfg.norm_position == "post":
        # every step assumes norms read an additive stream (pre-norm); post-norm norms rewrite it
        raise UnsupportedModelError("weight processing needs a pre-norm model, not post-norm")
    if not model.cfg.pre_norms:
        # no norm reads the stream before a sublayer, so there is nothing to fold or centre for
        raise UnsupportedModelError(
            "weight processing needs a pre-norm model: this one (OLMo 2) norms only the "
            "sublayer outputs (ln1_post/ln2_post)"
        )
    if center_writing_weights:
        _check_centering_is_exact(model)
    if center_unembed and model.cfg.output_softcap:
        # a per-position shift of the logits does not pass through cap * tanh(logits / cap)
        raise UnsupportedModelError(
            "center_unembed would change log-probs under output soft-capping "
            f"(output_softcap={model.cfg.output_softcap}): the cap is applied to the shifted logits"
        )
    if fold_ln:
        _norm_readers(model)  # refuses norms it cannot fold before anything changes
    if refactor_factored_attn_matrices:
        _check_refactor_applies(model)
    cfg_changes: dict[str, bool] = {}
    with torch.no_grad():
        if fold_ln:
            fold_layer_norm(model, cfg_changes)
        if center_writing_weights:
            center_residual_writes(model)
        if center_unembed:
            center_unembedding(model)
        if fold_value_biases:
            fold_value_biases_into_output(model, cfg_changes)
        if refactor_factored_attn_matrices:
            refactor_attention(model, cfg_changes)
    done = model.cfg.extra.get("processing", [])
    applied = [s for s in STEPS if s in done or asked[s]]
    _replace_cfg(model, extra={**model.cfg.extra, "processing": applied}, **cfg_changes)
    return model


def process_weights_(
    model: Any,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> Any:
    """TransformerLens's in-place processing with its defaults: ``process_weights`` of these.

    Like TransformerLens's (whose loader folds value biases by default), it
    also folds value biases. Unlike it, a step that cannot apply is refused
    rather than skipped: on RMSNorm models pass ``center_writing_weights=False``.
    Folded norms stay norms with ``w=1, b=0`` (TransformerLens swaps in
    ``LayerNormPre``). Returns ``model``.
    """
    return process_weights(
        model,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=True,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )


# --- fold_ln ------------------------------------------------------------------------------
# A reader of a norm's output: (module, weight attribute [d_model, d_out], bias attribute or
# None when the layer has no bias slot, config field that switches that bias on)
Reader = tuple[nn.Module, str, str | None, str]


def fold_layer_norm(model: Any, cfg_changes: dict[str, bool]) -> None:
    """Fold each norm's ``w`` (and LayerNorm's ``b``) into the layers reading it.

    ``y = (n * w + b) @ W + c`` becomes ``n @ (w[:, None] * W) + (b @ W + c)``,
    and the norm's ``w``/``b`` become ones/zeros. For LayerNorm the reading
    weights are also centred over ``d_model``, which changes nothing because the
    normalised input ``n`` has zero mean. Biases a LayerNorm bias must go into are
    created (zeros) where the model lacks them, and ``cfg_changes`` records the
    config fields that must now say so.
    """
    for norm, readers in _norm_readers(model):
        is_layernorm = isinstance(norm, LayerNorm)
        ln_bias = norm.b.detach() if isinstance(norm, LayerNorm) and bool(norm.b.any()) else None
        for module, weight_name, bias_name, bias_field in readers:
            weight = getattr(module, weight_name)
            if ln_bias is not None and bias_name is not None:
                _ensure_biases(model, bias_field, cfg_changes)
                bias = getattr(module, bias_name)
                bias.copy_(_folded_bias(bias, weight, ln_bias))
            weight.copy_(_folded_weight(weight, norm.w.detach(), centre=is_layernorm))
        norm.w.fill_(1.0)
        if isinstance(norm, LayerNorm):
            norm.b.zero_()


def _folded_weight(
    weight: Float[Tensor, "*experts d_model d_out"], norm_w: Float[Tensor, " d_model"], centre: bool
) -> Float[Tensor, "*experts d_model d_out"]:
    folded = _work(weight) * _work(norm_w)[:, None]  # experts' [n_experts, d_model, d_out] too
    return folded - folded.mean(-2, keepdim=True) if centre else folded


def _folded_bias(
    bias: Float[Tensor, " d_out"],
    weight: Float[Tensor, "d_model d_out"],
    ln_bias: Float[Tensor, " d_model"],
) -> Float[Tensor, " d_out"]:
    return _work(bias) + _work(ln_bias) @ _work(weight)


def _mlp_readers(mlp: nn.Module) -> list[Reader]:
    """The weights reading an MLP's input: a dense MLP's, or a mixture of experts' router,
    experts (``[n_experts, d_model, d_expert]``, folded alike) and shared expert."""
    if not isinstance(mlp, MixtureOfExperts):
        readers: list[Reader] = [(mlp, "W_in", "b_in", "mlp_bias")]
        if mlp.W_gate is not None:
            readers.append((mlp, "W_gate", None, "mlp_bias"))
        return readers
    # no config switch creates MoE biases, so a LayerNorm bias is refused below
    readers = [(mlp, "W_router", None, ""), (mlp, "W_gate", None, ""), (mlp, "W_in", None, "")]
    if mlp.moe.d_shared:
        readers += _mlp_readers(mlp.shared)
        if mlp.W_shared_gate is not None:
            readers.append((mlp, "W_shared_gate", None, ""))
    return readers


def _norm_readers(model: Any) -> list[tuple[LayerNorm | RMSNorm, list[Reader]]]:
    """Each norm with the layers reading its output; refuses norms mitk cannot fold."""
    pairs: list[tuple[Any, list[Reader]]] = []
    for block in model.blocks:
        pairs.append((block.ln1, [(block.attn, "W_qkv", "b_qkv", "attn_qkv_bias")]))
        if hasattr(block, "mlp"):
            pairs.append((block.ln2, _mlp_readers(block.mlp)))
    pairs.append((model.ln_final, [(model.unembed, "W_U", "b_U", "unembed_bias")]))
    known = {id(norm) for norm, _ in pairs}
    for name, module in model.named_modules():
        # a norm whose readers we do not know (a post-norm) would be left half-folded
        leaf = name.rsplit(".", 1)[-1]
        is_norm = isinstance(module, (LayerNorm, RMSNorm)) or leaf.startswith("ln")
        # BLOOM's embedding norm writes the stream itself rather than feeding a layer, and
        # q/k norms read the projections (which ln1's weight folds into exactly): they stay
        # as they are, and the model's outputs with them
        inside = leaf in ("q_norm", "k_norm") and name.rsplit(".", 2)[-2] == "attn"
        if is_norm and id(module) not in known and name != "ln_embed" and not inside:
            raise UnsupportedModelError(f"fold_ln does not know which layers read norm {name!r}")
    for norm, readers in pairs:
        if not isinstance(norm, (LayerNorm, RMSNorm)):
            raise UnsupportedModelError(f"fold_ln cannot fold a {type(norm).__name__}")
        for _, weight_name, bias_name, _ in readers:
            if bias_name is None and isinstance(norm, LayerNorm) and bool(norm.b.any()):
                raise UnsupportedModelError(
                    f"fold_ln cannot fold a LayerNorm bias into {weight_name}: it has no bias"
                )
    return pairs


# --- center_writing_weights ---------------------------------------------------------------
def _check_centering_is_exact(model: Any) -> None:
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    if model.cfg.normalization != "layernorm" or not all(isinstance(m, LayerNorm) for m in norms):
        raise UnsupportedModelError(
            "center_writing_weights is exact only when every reader of the residual stream is "
            f"a LayerNorm (which removes the mean anyway); this model uses "
            f"normalization={model.cfg.normalization!r}, which keeps the mean, so centering "
            "would change its outputs"
        )


def center_residual_writes(model: Any) -> None:
    """Subtract the mean over ``d_model`` from every weight and bias writing to the stream.

    Covers ``W_E``, ``W_pos`` (learned positions; fixed sinusoids are left as
    they are), and each layer's ``W_O``, ``b_O``, ``W_out`` and ``b_out``. Only
    exact when LayerNorms read the stream.
    """
    pos_embed = getattr(model, "pos_embed", None)
    # fixed sinusoidal positions are no weight: they keep their mean, which the norms remove
    writes: list[Tensor | None] = [model.embed.W_E, getattr(pos_embed, "W_pos", None)]
    for block in model.blocks:
        writes += [block.attn.W_o_packed, block.attn.b_o_param]
        if hasattr(block, "mlp"):
            writes += [block.mlp.W_out, block.mlp.b_out]
            if isinstance(block.mlp, MixtureOfExperts) and block.mlp.moe.d_shared:
                writes += [block.mlp.shared.W_out, block.mlp.shared.b_out]
    for param in writes:
        if param is not None:
            param.copy_(_centred(param, dim=-1))


def _centred(param: Tensor, dim: int) -> Tensor:
    value = _work(param)
    return value - value.mean(dim, keepdim=True)


# --- center_unembed -----------------------------------------------------------------------
def center_unembedding(model: Any) -> None:
    """Subtract the mean over the vocabulary from ``W_U`` (and ``b_U``): logits shift per position.

    Softmax ignores a shift shared by every token, so log-probs are unchanged.
    """
    model.unembed.W_U.copy_(_centred(model.unembed.W_U, dim=-1))
    if model.unembed.b_U is not None:
        model.unembed.b_U.copy_(_centred(model.unembed.b_U, dim=-1))


# --- fold_value_biases --------------------------------------------------------------------
def fold_value_biases_into_output(model: Any, cfg_changes: dict[str, bool]) -> None:
    """Move each layer's value bias through ``W_O`` into ``b_O``; ``b_V`` becomes zero.

    Exact because each attention pattern row sums to 1, so a head's value bias
    adds the constant ``b_V @ W_O`` to its output. Grouped-query models: query
    head ``h`` reads value head ``h // group``, so each value bias counts once
    per query head that reads it. Refused with attention sinks, whose rows sum to
    less than 1.
    """
    cfg = model.cfg
    if cfg.attn_sinks:
        raise UnsupportedModelError(
            "fold_value_biases needs attention rows that sum to 1; with attention sinks "
            "(cfg.attn_sinks) each row gives the sink a share, so b_V's write varies per query"
        )
    for block in model.blocks:
        attn = block.attn
        if attn.b_qkv is None or not bool(attn.b_V.any()):
            continue
        b_v = _per_query_head(_work(attn.b_V), cfg.kv_group_size)
        constant = torch.einsum("hd,hdm->m", b_v, _work(attn.W_O))
        _ensure_biases(model, "attn_out_bias", cfg_changes)
        attn.b_o_param.copy_(_work(attn.b_o_param) + constant)
        attn.b_V.zero_()  # a view into b_qkv


def _per_query_head(
    kv_bias: Float[Tensor, "kv_head d_head"], group: int
) -> Float[Tensor, "head d_head"]:
    return kv_bias.repeat_interleave(group, dim=0)


# --- refactor_factored_attn_matrices ------------------------------------------------------
def _check_refactor_applies(model: Any) -> None:
    cfg = model.cfg
    if cfg.kernel_attention:
        # the refactoring keeps q . k, not phi(q) . phi(k)
        raise UnsupportedModelError(
            f"refactor_factored_attn_matrices keeps each head's q . k, which "
            f"attention_type={cfg.attention_type!r} does not read: its weights come from "
            "feature maps of q and k"
        )
    if cfg.positional == "rotary":
        # as TransformerLens refuses: rotation makes the QK matrix depend on both positions
        raise UnsupportedModelError(
            "refactor_factored_attn_matrices cannot refactor the QK circuit with rotary "
            "positions: the query-key bilinear form depends on the positions of both"
        )
    if cfg.n_key_value_heads != cfg.n_heads:
        raise UnsupportedModelError(
            "refactor_factored_attn_matrices needs one key/value head per query head; "
            f"this model shares {cfg.n_key_value_heads} key/value heads among {cfg.n_heads}"
        )


def refactor_attention(model: Any, cfg_changes: dict[str, bool]) -> None:
    """Rewrite each head's factors as TransformerLens's ``refactor_factored_attn_matrices``.

    QK: ``[W_Q; b_Q]`` and ``[W_K; b_K]`` (the bias as an extra input row
    that is always 1) become the balanced factors ``U √S`` and ``V √S`` of the
    SVD of ``[W_Q; b_Q] [W_K; b_K]ᵀ``, so every query-key score is unchanged.
    OV: the value bias moves into ``b_O`` (as ``fold_value_biases``), then
    ``W_V = U S`` and ``W_O = Vᵀ`` from the SVD of ``W_V W_O``: ``W_O`` has
    orthonormal rows. Each singular direction is signed so that the
    largest-magnitude entry of its ``W_Q`` (``W_V``) column is positive, which
    makes the result independent of the SVD routine and the step idempotent.
    """
    fold_value_biases_into_output(model, cfg_changes)
    for block in model.blocks:
        attn = block.attn
        has_bias = attn.b_qkv is not None
        w_q, w_k = _exact(attn.W_Q), _exact(attn.W_K)
        if has_bias:  # [head, d_model + 1, d_head]: the bias is the weight of a constant 1
            w_q = torch.cat([w_q, _exact(attn.b_Q)[:, None]], dim=1)
            w_k = torch.cat([w_k, _exact(attn.b_K)[:, None]], dim=1)
        w_q, w_k_t = _signed(*FactoredMatrix(w_q, w_k.mT).make_even().pair)
        w_k = w_k_t.mT
        attn.W_Q.copy_(w_q[:, : model.cfg.d_model])
        attn.W_K.copy_(w_k[:, : model.cfg.d_model])
        if has_bias:
            attn.b_Q.copy_(w_q[:, -1])
            attn.b_K.copy_(w_k[:, -1])
        u, s, v = FactoredMatrix(_exact(attn.W_V), _exact(attn.W_O)).svd()
        w_v, w_o = _signed(u * s[..., None, :], v.mT)
        attn.W_V.copy_(w_v)
        attn.W_O.copy_(w_o)


def _exact(param: Tensor) -> Tensor:
    # singular vectors move by rounding error / singular-value gap: float64 keeps them put
    return param.detach().double()


def _signed(
    left: Float[Tensor, "head d_in k"], right: Float[Tensor, "head k d_out"]
) -> tuple[Float[Tensor, "head d_in k"], Float[Tensor, "head k d_out"]]:
    """Flip paired columns of ``left`` and rows of ``right``: each column's largest entry > 0.

    The product ``left @ right`` is unchanged.
    """
    biggest = left.abs().argmax(dim=-2, keepdim=True)  # [head, 1, k]
    sign = torch.where(left.gather(-2, biggest) < 0, -1.0, 1.0).to(left.dtype)
    return left * sign, right * sign.mT


# --- shared -------------------------------------------------------------------------------
def _work(param: Tensor) -> Tensor:
    """``param`` in at least float32: folding products in half precision loses digits."""
    value = param.detach()
    return value if value.dtype in (torch.float32, torch.float64) else value.float()


# modules and attributes a config bias field switches on (zeros are created in all of them,
# so the saved state dict matches what the changed config builds)
_BIAS_SLOTS: dict[str, list[tuple[str, str, str]]] = {
    "attn_qkv_bias": [("attn", "b_qkv", "W_qkv")],
    "attn_out_bias": [("attn", "b_o_param", "W_o_packed")],
    "mlp_bias": [("mlp", "b_in", "W_in"), ("mlp", "b_out", "W_out")],
    "unembed_bias": [("unembed", "b_U", "W_U")],
}


def _ensure_biases(model: Any, cfg_field: str, cfg_changes: dict[str, bool]) -> None:
    """Create zero biases model-wide for ``cfg_field`` if the config lacks them."""
    if not getattr(model.cfg, cfg_field) and cfg_field not in cfg_changes:
        owners = [model] if cfg_field == "unembed_bias" else list(model.blocks)
        for owner in owners:
            for child, bias_name, weight_name in _BIAS_SLOTS[cfg_field]:
                module = getattr(owner, child, None)
                if module is not None and getattr(module, bias_name) is None:
                    weight = getattr(module, weight_name)
                    zeros = weight.new_zeros(weight.shape[-1])
                    setattr(module, bias_name, nn.Parameter(zeros, weight.requires_grad))
        cfg_changes[cfg_field] = True


def _replace_cfg(model: Any, **changes: Any) -> None:
    """Swap in a changed (frozen) config everywhere the old one is held."""
    old, new = model.cfg, model.cfg.replace(**changes)
    for module in model.modules():
        if getattr(module, "cfg", None) is old:
            module.cfg = new
