"""What every converter shares: Hugging Face config fields and weight names to mitk's.

A family file says which HF key holds what; the conversions the families have
in common are written once here: activation names, the config fields every
decoder has, and the embedding, norm, attention and MLP weights (rotary
settings are in ``rope.py``, experts in ``experts.py``). ``nn.Linear`` stores
``[d_out, d_in]`` and mitk ``[d_in, d_out]``, so weights are transposed unless a
family's layout is already mitk's (GPT-2's ``Conv1D``). HF names below are
module paths (no ``.weight``); mitk names are module paths too, or full
parameter keys where a helper says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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
