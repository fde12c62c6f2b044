"""Hugging Face GPT-J checkpoints to mitk weights.

GPT-J runs attention and MLP in parallel off one shared LayerNorm (``ln_1``),
rotates the first ``rotary_dim`` dimensions of each head in interleaved pairs
(``2i``, ``2i+1``), has no biases on q/k/v or the attention output, and a bias
on its unembedding. mitk's parallel block has a norm per sublayer, so ``ln_1``
is copied into both ``ln1`` and ``ln2``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.model.pretrained import mappings

KNOWN_FIELDS = frozenset({
    "activation_function", "layer_norm_epsilon", "n_embd", "n_head", "n_inner", "n_layer",
    "n_positions", "n_ctx", "rotary", "rotary_dim", "tie_word_embeddings", "vocab_size",
    *mappings.INERT_TRAINING_FIELDS,
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def gptj_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a GPT-J ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    fields = mappings.decoder_fields(hf, mappings.GPT2_NAMES, "gptj")
    fields |= {
        "positional": "rotary",
        "rotary_dim": hf.get("rotary_dim") or fields["d_head"],
        "rotary_style": "gptj",
        "parallel_attn_mlp": True,
        "attn_qkv_bias": False,
        "attn_out_bias": False,
        "unembed_bias": True,
    }
    return TransformerConfig(**{**fields, **overrides})


def gptj_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``GPTJForCausalLM`` state dict to mitk names."""
    sd = mappings.without_prefix(hf_state, "transformer.")
    out = {
        **mappings.embeddings(sd, "wte"),
        **mappings.norm(sd, "ln_f", "ln_final"),
        "unembed.b_U": sd.get("lm_head.bias", sd["wte.weight"].new_zeros(cfg.d_vocab)),
    }
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "h.{}"):
        # one shared norm feeds both sublayers; copies, so each can be edited alone
        ln2 = {k: v.clone() for k, v in mappings.norm(sd, f"{hf}.ln_1", f"{mk}.ln2").items()}
        out |= {
            **mappings.separate_qkv(
                sd, [f"{hf}.attn.{p}_proj" for p in "qkv"], f"{mk}.attn", bias=False
            ),
            **mappings.attn_out(sd, f"{hf}.attn.out_proj", f"{mk}.attn", bias=False),
            **mappings.norm(sd, f"{hf}.ln_1", f"{mk}.ln1"),
            **ln2,
            **mappings.mlp(sd, f"{hf}.mlp.fc_in", f"{hf}.mlp.fc_out", f"{mk}.mlp"),
        }
    return out
