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

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings

KNOWN_FIELDS = frozenset({
    "hidden_act", "hidden_size", "intermediate_size", "layer_norm_eps",
    "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
    "position_embedding_type", "tie_word_embeddings", "type_vocab_size", "vocab_size",
    *mappings.INERT_TRAINING_FIELDS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def bert_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a BERT ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise UnsupportedModelError("BERT as a decoder or with cross-attention is not supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported"
        )
    fields = mappings.decoder_fields(hf, mappings.ConfigNames(default_eps=1e-12), "bert")
    fields |= {
        "positional": "learned",
        "embed_norm": True,
        "token_types": hf.get("type_vocab_size", 2),
        "norm_position": "post",
        "final_norm": False,
        "has_lm_head": False,
        "causal": False,
        "default_prepend_bos": False,  # BERT's tokenizer adds [CLS]/[SEP] itself
    }
    return TransformerConfig(**{**fields, **overrides})


def bert_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``BertModel`` (or ``Bert*``'s ``bert.``) state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "bert.")
    out = {
        # no LM head: W_U is the tied word embedding, as BERT's MLM decoder would use it
        **mappings.embeddings(
            sd, "embeddings.word_embeddings", position="embeddings.position_embeddings", heads=()
        ),
        "token_type_embed.W_token_type": sd["embeddings.token_type_embeddings.weight"],
        **mappings.norm(sd, "embeddings.LayerNorm", "ln_embed"),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "encoder.layer.{}"):
        qkv = [f"{hf}.attention.self.{which}" for which in ("query", "key", "value")]
        out |= {
            # BigBird's checkpoints may leave the q/k/v biases out (use_bias=False)
            **mappings.separate_qkv(sd, qkv, f"{mk}.attn", bias=cfg.attn_qkv_bias),
            **mappings.attn_out(sd, f"{hf}.attention.output.dense", f"{mk}.attn", bias=True),
            # post-norm: ln1 follows attention, ln2 the MLP
            **mappings.block_norms(sd, hf, mk, ("attention.output.LayerNorm", "output.LayerNorm")),
            **mappings.mlp(sd, f"{hf}.intermediate.dense", f"{hf}.output.dense", f"{mk}.mlp"),
        }
    return out
