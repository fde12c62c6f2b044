"""What every converter shares: Hugging Face config fields and weight names to mitk's.

A family file says which HF key holds what; the conversions the families have
in common are written once here: activation names, the config fields every
decoder has, rotary settings, and the embedding, norm, attention and MLP
weights. ``nn.Linear`` stores ``[d_out, d_in]`` and mitk ``[d_in, d_out]``, so
weights are transposed unless a family's layout is already mitk's (GPT-2's
``Conv1D``). HF names below are module paths (no ``.weight``); mitk names are
module paths too, or full parameter keys where a helper says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
import math
from typing import Any

import torch
from torch import Tensor

from mitk.config import RotaryScaling
from mitk.errors import UnsupportedModelError
from mitk.shapes import Float

Weights = dict[str, Tensor]

HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def hf_activation(name: str) -> str:
    """mitk's name for a Hugging Face ``activation_function``/``hidden_act``."""
    if name not in HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported; known: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


@dataclass(frozen=True)
class ConfigNames:
    """Which ``config.json`` field holds each size a decoder has (HF's names differ by family)."""

    d_model: str = "hidden_size"
    n_layers: str = "num_hidden_layers"
    n_heads: str = "num_attention_heads"
    d_mlp: str = "intermediate_size"
    n_ctx: str = "max_position_embeddings"
    act: str = "hidden_act"
    default_act: str = "gelu"
    eps: str = "layer_norm_eps"
    default_eps: float = 1e-5
    mlp_defaults_to_4x: bool = False
    """True where HF writes ``None`` for the usual ``4 * d_model`` MLP width."""


GPT2_NAMES = ConfigNames(
    d_model="n_embd",
    n_layers="n_layer",
    n_heads="n_head",
    d_mlp="n_inner",
    n_ctx="n_positions",
    act="activation_function",
    default_act="gelu_new",
    eps="layer_norm_epsilon",
    mlp_defaults_to_4x=True,
)
"""GPT-2's names, which GPT-J kept."""
LLAMA_NAMES = ConfigNames(default_act="silu", eps="rms_norm_eps", default_eps=1e-6)
"""LLaMA's names (RMSNorm epsilon, SwiGLU by default), which its descendants kept."""


def decoder_fields(
    hf: dict[str, Any], names: ConfigNames, architecture: str, *, d_head: int | None = None
) -> dict[str, Any]:
    """The ``TransformerConfig`` fields every converted decoder sets; a family adds its own.

    ``d_head`` defaults to ``d_model // n_heads`` and sets the usual
    ``1/sqrt(d_head)`` attention scale.
    """
    d_model, n_heads = hf[names.d_model], hf[names.n_heads]
    d_head = d_head or d_model // n_heads
    fallback = names.mlp_defaults_to_4x
    d_mlp = (hf.get(names.d_mlp) or 4 * d_model) if fallback else hf[names.d_mlp]
    return {
        "d_model": d_model,
        "n_layers": hf[names.n_layers],
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": d_mlp,
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf[names.n_ctx],
        "act_fn": hf_activation(hf.get(names.act, names.default_act)),
        "norm_eps": hf.get(names.eps, names.default_eps),
        "attn_scale": d_head**-0.5,
        "architecture": architecture,
        "extra": {"source_model_type": architecture},
    }


HF_BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype",
    "id2label", "label2id", "is_encoder_decoder", "model_type", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "tokenizer_class", "use_bfloat16", "torchscript", "pruned_heads",
    "tie_encoder_decoder", "is_decoder", "add_cross_attention", "finetuning_task", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "tf_legacy_loss",
    "cross_attention_hidden_size", "return_dict_in_generate", "output_scores",
    # generation defaults older configs carry: they steer generate(), not the forward
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})  # fmt: skip
"""Config fields every HF model carries that do not change an inference forward."""


INERT_TRAINING_FIELDS = frozenset({
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "embed_dropout", "resid_dropout",
    "attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "classifier_dropout", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "gradient_checkpointing",
})  # fmt: skip
"""Dropout rates, the sequence-classification head's settings and training switches that
older configs carry: none of them touches an inference forward."""


def refuse_unknown_fields(hf: dict[str, Any], known: Iterable[str]) -> None:
    """``UnsupportedModelError`` naming every ``config.json`` field outside ``known``.

    A family's converter lists the fields it reads (or knows to be inert), so a
    new variant's field is refused instead of silently ignored.
    """
    unknown = sorted(set(hf) - set(known) - HF_BOOKKEEPING)
    if unknown:
        raise UnsupportedModelError(
            f"{hf.get('model_type')} config field(s) {', '.join(unknown)} are not supported "
            "(mitk cannot tell whether they change the computation)"
        )


ROPE_PARAMETERS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor",
                       "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": frozenset({"short_factor", "long_factor", "factor", "attention_factor",
                           "original_max_position_embeddings"}),
}  # fmt: skip
"""The ``rope_parameters`` keys each supported ``rope_type`` reads, besides theta and type."""
_ROPE_COMMON = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
LONGROPE_RERUNS_AT_SWITCH = frozenset({"phi3"})
"""Families whose HF ``generate`` reruns the sequence once LongRoPE takes its long factors
(``RotaryScaling.recompute_at_switch``); the others (LLaMA) keep the keys they cached."""


def rope_fields(
    hf: dict[str, Any], d_head: int, default_fraction: float = 1.0, *, scaled: bool = False
) -> dict[str, Any]:
    """``positional``, ``rotary_dim``, ``rotary_base`` (and ``rotary_scaling``) for a HF config.

    Reads the old (``rope_theta``, ``rope_scaling``) and the new
    (``rope_parameters``) layout. Families whose attention applies scaling pass
    ``scaled=True`` and get ``linear``/``dynamic``/``yarn``/``llama3``/``longrope``; any
    other ``rope_type``, or an unknown key of a supported one, raises
    ``UnsupportedModelError`` rather than silently computing different positions.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    supported = sorted(ROPE_PARAMETERS) if scaled else ["default"]
    if rope_type not in supported:
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} is not supported for {hf.get('model_type')}; "
            f"supported: {', '.join(repr(t) for t in supported)}"
        )
    unknown = sorted(set(params) - _ROPE_COMMON - ROPE_PARAMETERS[rope_type])
    if unknown:
        raise UnsupportedModelError(f"rope_type {rope_type!r} parameter(s) {unknown} unsupported")
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get(
        "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct"))
    )
    fraction = default_fraction if fraction is None else fraction
    fields = {"positional": "rotary", "rotary_dim": int(d_head * fraction), "rotary_base": base}
    if rope_type == "longrope":
        _check_per_pair_factors(params, fields["rotary_dim"])
    if rope_type != "default":
        fields["rotary_scaling"] = rotary_scaling(hf, params, rope_type)
    return fields


def _check_per_pair_factors(params: dict[str, Any], rotary_dim: int) -> None:
    """LongRoPE's factor lists hold one positive number per rotated pair, or are refused."""
    for key in ("short_factor", "long_factor"):
        factors = params.get(key)
        if not isinstance(factors, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in factors
        ):
            raise UnsupportedModelError(
                f"longrope {key} must be a list of positive numbers, got {factors!r}"
            )
        if len(factors) != rotary_dim // 2:
            raise UnsupportedModelError(
                f"longrope {key} has {len(factors)} entries; the rotary part has "
                f"rotary_dim / 2 = {rotary_dim // 2} pairs"
            )


def rotary_scaling(hf: dict[str, Any], params: dict[str, Any], rope_type: str) -> RotaryScaling:
    """Hugging Face's scaling parameters with its defaults resolved (see ``RotaryScaling``)."""
    n_ctx = hf["max_position_embeddings"]
    # HF prefers a top-level original_max_position_embeddings (Phi-3) to the rope dict's
    original = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", n_ctx
    )
    if rope_type == "dynamic":  # rescales past max_position_embeddings, whatever else is set
        return RotaryScaling(kind="dynamic", factor=float(params["factor"]), original_context=n_ctx)
    if rope_type == "linear":
        return RotaryScaling(kind="linear", factor=float(params["factor"]))
    if rope_type == "longrope":
        return _longrope_scaling(hf, params, original)
    if rope_type == "llama3":
        return RotaryScaling(
            kind="llama3",
            factor=float(params["factor"]),
            original_context=original,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    factor = params.get("factor") or n_ctx / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else _yarn_mscale(factor, 1.0)
        )
    return RotaryScaling(
        kind="yarn",
        factor=float(factor),
        original_context=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def _longrope_scaling(hf: dict[str, Any], params: dict[str, Any], original: int) -> RotaryScaling:
    """LongRoPE's per-pair factors; its attention factor defaults to HF's
    ``sqrt(1 + ln(factor) / ln(original))``, ``factor = max_position_embeddings / original``."""
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        extends = factor > 1
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if extends else 1.0
    return RotaryScaling(
        kind="longrope",
        factor=float(factor),
        original_context=original,
        attention_factor=float(attention_factor),
        short_factor=[float(x) for x in params["short_factor"]],
        long_factor=[float(x) for x in params["long_factor"]],
        recompute_at_switch=hf.get("model_type") in LONGROPE_RERUNS_AT_SWITCH,
    )


def _yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def without_prefix(state: Weights, prefix: str) -> Weights:
    """``state`` with ``prefix`` taken off its keys (``*ForCausalLM`` wraps the bare model)."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def layer_prefixes(n_layers: int, hf: str) -> Iterator[tuple[str, str]]:
    """Each block's HF and mitk module paths; ``hf`` holds ``{}`` where the index goes."""
    for layer in range(n_layers):
        yield hf.format(layer), f"blocks.{layer}"


def linear(
    sd: Weights, hf: str, weight: str, bias: str | None = None, *, transpose: bool = True
) -> Weights:
    """HF projection ``hf`` as the mitk parameters ``weight`` (and ``bias``), full keys."""
    w = sd[f"{hf}.weight"]
    out = {weight: w.T if transpose else w}
    if bias is not None:
        out[bias] = sd[f"{hf}.bias"]
    return out


def norm(sd: Weights, hf: str, mk: str, *, bias: bool = True) -> Weights:
    """Norm ``hf`` as mitk's ``mk.w`` (and ``mk.b``; RMSNorms have none)."""
    out = {f"{mk}.w": sd[f"{hf}.weight"]}
    if bias:
        out[f"{mk}.b"] = sd[f"{hf}.bias"]
    return out


def bias_free_layernorm(weight: Tensor, mk: str) -> Weights:
    """A bias-free LayerNorm's ``weight`` as mitk's LayerNorm ``mk``, whose ``b`` is zeros."""
    return {f"{mk}.w": weight, f"{mk}.b": torch.zeros_like(weight)}


def block_norms(
    sd: Weights,
    hf: str,
    mk: str,
    names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm"),
    *,
    bias: bool = True,
) -> Weights:
    """A block's norm before attention and before the MLP as mitk's ``ln1`` and ``ln2``.

    The default names are the ones GPT-NeoX, BLOOM and the LLaMA family share.
    """
    before_attn, before_mlp = names
    return {
        **norm(sd, f"{hf}.{before_attn}", f"{mk}.ln1", bias=bias),
        **norm(sd, f"{hf}.{before_mlp}", f"{mk}.ln2", bias=bias),
    }


def embeddings(
    sd: Weights, token: str, *, position: str | None = None, heads: Sequence[str] = ("lm_head",)
) -> Weights:
    """Token (and learned position) embedding and the unembedding, under mitk names.

    The unembedding is the first of ``heads`` the checkpoint stores; tied
    checkpoints store none, and then it is the token embedding.
    """
    w_e = sd[f"{token}.weight"]
    w_u = next((sd[f"{head}.weight"] for head in heads if f"{head}.weight" in sd), w_e)
    out = {"embed.W_E": w_e, "unembed.W_U": w_u.T}
    if position is not None:
        out["pos_embed.W_pos"] = sd[f"{position}.weight"]
    return out


def separate_qkv(sd: Weights, projections: Sequence[str], mk: str, *, bias: bool) -> Weights:
    """Separate q, k, v ``nn.Linear`` projections packed as attention ``mk``'s ``W_qkv``/``b_qkv``.

    mitk packs them along ``d_out``: ``[d_model, (n_heads + 2 n_kv_heads) d_head]``.
    """
    out = {f"{mk}.W_qkv": torch.cat([sd[f"{p}.weight"] for p in projections]).T}
    if bias:
        out[f"{mk}.b_qkv"] = torch.cat([sd[f"{p}.bias"] for p in projections])
    return out


def packed_qkv(sd: Weights, hf: str, mk: str, *, bias: bool) -> Weights:
    """One projection packing all q rows, then all k, then all v (Phi-3) as ``mk``'s ``W_qkv``.

    That is mitk's own order (see ``separate_qkv``), so it is only transposed.
    """
    return linear(sd, hf, f"{mk}.W_qkv", f"{mk}.b_qkv" if bias else None)


def per_kind_order(
    packed: Float[Tensor, "qkv_out ..."], n_heads: int
) -> Float[Tensor, "qkv_out ..."]:
    """Rows packed head by head (``[head, (q|k|v), d_head]``) reordered as all q, all k, all v."""
    return packed.unflatten(0, (n_heads, 3, -1)).transpose(0, 1).flatten(0, 2)


def per_head_qkv(sd: Weights, hf: str, mk: str, n_heads: int, *, bias: bool) -> Weights:
    """A fused projection packed head by head (GPT-NeoX, BLOOM) as ``mk``'s ``W_qkv``/``b_qkv``."""
    out = {f"{mk}.W_qkv": per_kind_order(sd[f"{hf}.weight"], n_heads).T}
    if bias:
        out[f"{mk}.b_qkv"] = per_kind_order(sd[f"{hf}.bias"], n_heads)
    return out


def attn_out(sd: Weights, hf: str, mk: str, *, bias: bool, transpose: bool = True) -> Weights:
    """The attention output projection ``hf`` as attention ``mk``'s ``W_o_packed``/``b_o_param``."""
    return linear(
        sd, hf, f"{mk}.W_o_packed", f"{mk}.b_o_param" if bias else None, transpose=transpose
    )


def mlp(
    sd: Weights,
    hf_in: str,
    hf_out: str,
    mk: str,
    *,
    gate: str | None = None,
    bias: bool = True,
    transpose: bool = True,
) -> Weights:
    """An MLP's input (and ``gate``) and output projections as ``mk``'s ``W_in``/``W_out``...

    Gated MLPs in the converted families carry no biases, so the gate takes none.
    """
    out = {
        **linear(sd, hf_in, f"{mk}.W_in", f"{mk}.b_in" if bias else None, transpose=transpose),
        **linear(sd, hf_out, f"{mk}.W_out", f"{mk}.b_out" if bias else None, transpose=transpose),
    }
    if gate is not None:
        out |= linear(sd, gate, f"{mk}.W_gate", transpose=transpose)
    return out


def packed_gated_mlp(sd: Weights, gate_up: str, down: str, mk: str) -> Weights:
    """A bias-free gated MLP whose gate and up projections are one ``nn.Linear`` (Phi-3).

    ``gate_up`` holds the gate's rows first, then the up (mitk's ``W_in``) rows.
    """
    gate, up = sd[f"{gate_up}.weight"].chunk(2)
    return {f"{mk}.W_gate": gate.T, f"{mk}.W_in": up.T, **linear(sd, down, f"{mk}.W_out")}


def megatron_block(
    sd: Weights, hf: str, mk: str, attn: str, n_heads: int, *, bias: bool
) -> Weights:
    """Block ``hf`` under the Megatron-LM names GPT-NeoX and BLOOM kept, as block ``mk``.

    ``attn`` is the attention module's name; its fused ``query_key_value`` is
    packed head by head. ``bias`` covers q/k/v and the attention output.
    """
    return {
        **per_head_qkv(sd, f"{hf}.{attn}.query_key_value", f"{mk}.attn", n_heads, bias=bias),
        **attn_out(sd, f"{hf}.{attn}.dense", f"{mk}.attn", bias=bias),
        **block_norms(sd, hf, mk),
        **mlp(sd, f"{hf}.mlp.dense_h_to_4h", f"{hf}.mlp.dense_4h_to_h", f"{mk}.mlp"),
    }


def qk_norms(sd: Weights, attn: str, mk: str) -> Weights:
    """Attention ``attn``'s q/k RMSNorms (Qwen 3, OLMo 2) as ``mk``'s ``q_norm``/``k_norm``."""
    return {
        **norm(sd, f"{attn}.q_norm", f"{mk}.q_norm", bias=False),
        **norm(sd, f"{attn}.k_norm", f"{mk}.k_norm", bias=False),
    }


def llama_attention(sd: Weights, attn: str, mk: str, *, qkv_bias: bool, out_bias: bool) -> Weights:
    """Attention ``attn``'s ``q/k/v/o_proj`` (the names LLaMA's descendants kept) as ``mk``'s."""
    qkv = [f"{attn}.{p}_proj" for p in "qkv"]
    return {
        **separate_qkv(sd, qkv, mk, bias=qkv_bias),
        **attn_out(sd, f"{attn}.o_proj", mk, bias=out_bias),
    }


def llama_mlp(sd: Weights, hf: str, mk: str) -> Weights:
    """Block ``hf``'s SwiGLU MLP under the names LLaMA's descendants kept, as block ``mk``'s."""
    return mlp(
        sd,
        f"{hf}.mlp.up_proj",
        f"{hf}.mlp.down_proj",
        f"{mk}.mlp",
        gate=f"{hf}.mlp.gate_proj",
        bias=False,
    )
