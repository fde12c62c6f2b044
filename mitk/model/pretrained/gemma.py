"""Hugging Face Gemma and Gemma-2 checkpoints to mitk weights.

Both share LLaMA's layout (rotary, grouped-query attention, a gated MLP, here
GeGLU with tanh-approximated gelu), with two differences absorbed at load time
so that every analysis reading the weights stays exact:

- Gemma's RMSNorm multiplies by ``1 + w``: mitk stores ``ln*.w = 1 + w`` (computed
  in fp32), so ``ln.w`` is the factor the norm really applies (DLA, ``fold_ln``).
- The embedding is scaled by ``sqrt(d_model)`` (cast to the model dtype, as Hugging
  Face does): mitk stores the scaled ``W_E``, as TransformerLens does, so
  ``hook_embed`` sees what enters the stream. The (tied) unembedding is unscaled.

Gemma-2 adds sandwich norms (``ln1_post``/``ln2_post`` after each sublayer;
HF's ``pre_feedforward_layernorm`` is ``ln2``), attention and final-logit
soft-capping, ``query_pre_attn_scalar`` as the attention scale and a sliding
window on the layers its ``layer_types`` name. Gemma 3 (``gemma3.py``) builds on
both functions: its q/k norms' weights are folded the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.config import TORCH_DTYPES, TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings
from mitk.model.pretrained.llama import llama_config, llama_state_dict

GEMMA_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "hidden_activation", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "rope_scaling", "rope_theta", "attention_bias",
    "use_bidirectional_attention",
})  # fmt: skip
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "gemma": GEMMA_FIELDS,
    "gemma2": GEMMA_FIELDS | {
        "query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
        "attn_logit_softcapping",
        "sliding_window_size",  # early Gemma-2 configs repeat the window here; HF ignores it
        "cache_implementation",  # which KV cache generate() builds: not the forward
    },
}  # fmt: skip
"""``config.json`` fields each conversion reads or knows to be inert; others are refused.
(Gemma 3 has its own list in ``gemma3.py``.)"""


def gemma_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Gemma or Gemma-2 ``config.json``."""
    model_type = hf["model_type"]
    if model_type in KNOWN_FIELDS:
        mappings.refuse_unknown_fields(hf, KNOWN_FIELDS[model_type])
    if model_type == "gemma2" and hf.get("layer_types") is None:
        # HF's default for configs without layer_types: even layers local (windowed)
        kinds = ("sliding_attention", "full_attention")
        hf = {**hf, "layer_types": [kinds[i % 2] for i in range(hf["num_hidden_layers"])]}
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{model_type} with bidirectional attention is not supported")
    # old Gemma configs say "gelu" but mean the tanh approximation (HF rewrites it too)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    fields: dict[str, Any] = {
        "act_fn": "gelu_tanh" if act == "gelu" else mappings.hf_activation(act),
        "attn_out_bias": bool(hf.get("attention_bias", False)),
        "extra": {
            "source_model_type": model_type,
            "converted": "ln*.w = 1 + w (Gemma RMSNorm); W_E scaled by sqrt(d_model)",
        },
    }
    if model_type in ("gemma2", "gemma3_text"):
        fields |= {
            "attn_scale": float(hf["query_pre_attn_scalar"]) ** -0.5,
            "sandwich_norms": True,
            "attn_softcap": float(hf.get("attn_logit_softcapping") or 0.0),
            "output_softcap": float(hf.get("final_logit_softcapping") or 0.0),
        }
    return llama_config(hf, **{**fields, **overrides})


def gemma_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename a Gemma(-2, -3) ``*ForCausalLM`` state dict to mitk names, with the offsets above."""
    out = llama_state_dict(hf_state, cfg)
    sd = mappings.without_prefix(hf_state, "model.")
    if cfg.sandwich_norms:
        for hf, mk in mappings.layer_prefixes(cfg.n_layers, "layers.{}"):
            # Gemma-2's post_attention_layernorm normalises the attention output, not the MLP input
            out |= {
                **mappings.norm(sd, f"{hf}.post_attention_layernorm", f"{mk}.ln1_post", bias=False),
                **mappings.norm(sd, f"{hf}.pre_feedforward_layernorm", f"{mk}.ln2", bias=False),
                **mappings.norm(
                    sd, f"{hf}.post_feedforward_layernorm", f"{mk}.ln2_post", bias=False
                ),
            }
    for name in out:
        module = name.rsplit(".", 2)[-2]
        if (module.startswith("ln") or module in ("q_norm", "k_norm")) and name.endswith(".w"):
            out[name] = 1.0 + out[name].float()  # HF adds the 1 in fp32, too
    dtype = TORCH_DTYPES[cfg.dtype]
    w_e = out["embed.W_E"].to(dtype)
    out["embed.W_E"] = w_e * torch.tensor(cfg.d_model**0.5, dtype=dtype)
    return out
