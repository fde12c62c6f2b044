"""Hugging Face BERT encoders (``BertModel``) to mitk weights.

BERT is a post-norm, bidirectional encoder: word + position + token-type
embeddings go through a LayerNorm (mitk's ``ln_embed``), and each block is
``x = ln1(x + attn(x)); x = ln2(x + mlp(x))``. ``last_hidden_state`` is the
last block's output, so there is no final norm. Only the encoder is converted:
the pooler and any MLM/NSP heads are ignored, the model is a bare encoder
(``has_lm_head=False``, logits refused) and ``W_U`` holds the tied word
embedding, transposed, as BERT's MLM decoder would. Position ids count real
tokens (as for every mitk model), which equals BERT's ``arange`` under the
right padding its tokenizer uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.gpt2 import hf_activation


def bert_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a BERT ``config.json``."""
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise UnsupportedModelError("BERT as a decoder or with cross-attention is not supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported"
        )
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    fields: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "d_mlp": hf["intermediate_size"],
        "d_vocab": hf["vocab_size"],
        "n_ctx": hf["max_position_embeddings"],
        "act_fn": hf_activation(hf.get("hidden_act", "gelu")),
        "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "positional": "learned",
        "embed_norm": True,
        "token_types": hf.get("type_vocab_size", 2),
        "norm_position": "post",
        "final_norm": False,
        "has_lm_head": False,
        "causal": False,
        "attn_scale": (d_model // n_heads) ** -0.5,
        "architecture": "bert",
        "default_prepend_bos": False,  # BERT's tokenizer adds [CLS]/[SEP] itself
        "extra": {"source_model_type": "bert"},
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def bert_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``BertModel`` (or ``Bert*``'s ``bert.``) state dict to mitk names."""
    sd = {k.removeprefix("bert."): v for k, v in hf_state.items()}
    emb = "embeddings."
    out = {
        "embed.W_E": sd[emb + "word_embeddings.weight"],
        "pos_embed.W_pos": sd[emb + "position_embeddings.weight"],
        "token_type_embed.W_token_type": sd[emb + "token_type_embeddings.weight"],
        "ln_embed.w": sd[emb + "LayerNorm.weight"],
        "ln_embed.b": sd[emb + "LayerNorm.bias"],
        "unembed.W_U": sd[emb + "word_embeddings.weight"].T,
    }
    for layer in range(cfg.n_layers):
        hf, mk = f"encoder.layer.{layer}.", f"blocks.{layer}."
        att = hf + "attention."
        # nn.Linear stores [d_out, d_in]; mitk packs q | k | v along d_out of a [d_in, d_out]
        qkv = [att + f"self.{which}." for which in ("query", "key", "value")]
        out |= {
            mk + "attn.W_qkv": torch.cat([sd[p + "weight"].T for p in qkv], dim=1),
            mk + "attn.b_qkv": torch.cat([sd[p + "bias"] for p in qkv]),
            mk + "attn.W_o_packed": sd[att + "output.dense.weight"].T,
            mk + "attn.b_o_param": sd[att + "output.dense.bias"],
            mk + "ln1.w": sd[att + "output.LayerNorm.weight"],
            mk + "ln1.b": sd[att + "output.LayerNorm.bias"],
            mk + "mlp.W_in": sd[hf + "intermediate.dense.weight"].T,
            mk + "mlp.b_in": sd[hf + "intermediate.dense.bias"],
            mk + "mlp.W_out": sd[hf + "output.dense.weight"].T,
            mk + "mlp.b_out": sd[hf + "output.dense.bias"],
            mk + "ln2.w": sd[hf + "output.LayerNorm.weight"],
            mk + "ln2.b": sd[hf + "output.LayerNorm.bias"],
        }
    return out
