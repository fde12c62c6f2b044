"""Hugging Face Nyströmformer encoders (``NystromformerModel``) to mitk weights.

The layout is BERT's (``bert.py``: post-norm blocks, word + position + token-type
embeddings through ``ln_embed``, no final norm, a bare encoder), with Nyström attention
in every layer (``NystromConfig``, ``mitk.model.nystrom_attention``). Hugging Face reads
position ``i`` from row ``i + 2`` of its position table (RoBERTa's offset, though not
RoBERTa's padding-aware ids): mitk's ``W_pos`` is the table from row 2, so positions
agree under right padding. ``inv_coeff_init_option=True`` is refused: Hugging Face's own
model fails on it (it indexes the config by a key that does not exist).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import TransformerConfig
from mitk.config.nystrom import NystromConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import bert, mappings

POSITION_OFFSET = 2
"""Hugging Face's position ids start at 2 (``arange(n) + 2``)."""
KNOWN_FIELDS = frozenset({
    *bert.KNOWN_FIELDS, "segment_means_seq_len", "num_landmarks", "conv_kernel_size",
    "inv_coeff_init_option",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def nystromformer_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Nyströmformer ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    if hf.get("inv_coeff_init_option"):
        raise UnsupportedModelError(
            "nystromformer inv_coeff_init_option=True is not supported (Hugging Face's model "
            "fails on it)"
        )
    nystrom = NystromConfig(
        num_landmarks=hf.get("num_landmarks", 64),
        segment_means_seq_len=hf.get("segment_means_seq_len", 64),
        conv_kernel_size=hf.get("conv_kernel_size", 65) or 0,
    )
    # the fields BERT shares, with Nyströmformer's defaults where a config.json leaves them out
    shared = {k: v for k, v in hf.items() if k in bert.KNOWN_FIELDS or k == "model_type"}
    shared = {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5, **shared}
    return bert.bert_config(
        shared,
        nystrom=nystrom,
        slot_positions=True,  # padded tokens reach real ones: their positions must be HF's
        architecture="nystromformer",
        extra={"source_model_type": "nystromformer"},
        **overrides,
    )


def nystromformer_state_dict(
    hf_state: dict[str, Tensor], cfg: TransformerConfig
) -> dict[str, Tensor]:
    """Rename a ``NystromformerModel`` (or a head model's ``nystromformer.``) state dict."""
    sd = mappings.without_prefix(hf_state, "nystromformer.")
    out = bert.bert_state_dict(sd, cfg)
    out["pos_embed.W_pos"] = sd["embeddings.position_embeddings.weight"][POSITION_OFFSET:]
    assert cfg.nystrom is not None
    if cfg.nystrom.conv_kernel_size:
        for hf, mk in mappings.layer_prefixes(cfg.n_layers, "encoder.layer.{}"):
            conv = sd[f"{hf}.attention.self.conv.weight"]  # [head, 1, taps, 1]
            out[f"{mk}.attn.W_conv"] = conv.reshape(conv.shape[0], conv.shape[2])
    return out
