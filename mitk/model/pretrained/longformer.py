"""Hugging Face Longformer encoders (``LongformerModel``) to mitk weights.

Longformer is RoBERTa (a post-norm BERT, see ``bert.py``) whose self-attention is a
sliding window of ``attention_window[L]`` positions plus global tokens
(``cfg.longformer``; ``mitk.model.longformer_attention``). Each layer carries a
second set of q/k/v projections, ``query_global``/``key_global``/``value_global``,
packed as the attention's ``W_qkv_global``. Hugging Face pads the input to a
multiple of the window with pad tokens that nothing attends to; mitk needs no
padding, as its banded path takes any length.

Positions: RoBERTa counts them from ``pad_token_id + 1`` (row ``pad_token_id`` of
the table is the padding row), over the tokens that are not ``pad_token_id``. mitk
counts real tokens from 0 by the attention mask, so ``W_pos`` is the table from row
``pad_token_id + 1`` on; the two agree wherever the pad token sits exactly at the
masked positions (a pad id inside the text gets Hugging Face's padding row there).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mitk.config import LongformerConfig, TransformerConfig
from mitk.errors import ConfigError, UnsupportedModelError
from mitk.model.pretrained import mappings
from mitk.model.pretrained.bert import KNOWN_FIELDS as BERT_FIELDS
from mitk.model.pretrained.bert import bert_config, bert_state_dict

ONLY_LONGFORMER = frozenset({"attention_window", "onnx_export"})
"""Fields BERT lacks: the window, and ``onnx_export`` (an equal computation in another layout)."""
KNOWN_FIELDS = (BERT_FIELDS - {"position_embedding_type"}) | ONLY_LONGFORMER
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def _windows(hf: dict[str, Any]) -> list[int]:
    layers = hf["num_hidden_layers"]
    window = hf.get("attention_window", 512)
    windows = [window] * layers if isinstance(window, int) else window
    if not isinstance(windows, list) or len(windows) != layers:
        raise ConfigError(
            f"attention_window must be an int or one int per layer ({layers}), got {window!r}"
        )
    return windows


def _position_offset(hf: dict[str, Any]) -> int:
    """Rows of Hugging Face's position table before position 0 (``pad_token_id + 1``)."""
    pad = hf.get("pad_token_id", 1)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise UnsupportedModelError(
            f"longformer pad_token_id {pad!r}: RoBERTa's positions count from it, so it must be "
            "a token id"
        )
    if hf["max_position_embeddings"] <= pad + 1:
        raise ConfigError(
            f"max_position_embeddings {hf['max_position_embeddings']} leaves no position after "
            f"pad_token_id + 1 = {pad + 1}"
        )
    return pad + 1


def longformer_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a Longformer ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    offset = _position_offset(hf)
    bert_like = {k: v for k, v in hf.items() if k not in ONLY_LONGFORMER}
    return bert_config(
        bert_like,
        **{
            "n_ctx": hf["max_position_embeddings"] - offset,
            "architecture": "longformer",
            "extra": {"source_model_type": "longformer", "position_offset": offset},
            "longformer": LongformerConfig(_windows(hf)),
            **overrides,
        },
    )


def longformer_state_dict(hf_state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``LongformerModel`` (or ``Longformer*``'s ``longformer.``) state."""
    sd = mappings.without_prefix(hf_state, "longformer.")
    out = bert_state_dict(sd, cfg)
    offset = int(cfg.extra.get("position_offset", 2))
    out["pos_embed.W_pos"] = sd["embeddings.position_embeddings.weight"][offset:]
    for hf, mk in mappings.layer_prefixes(cfg.n_layers, "encoder.layer.{}"):
        qkv = [f"{hf}.attention.self.{which}_global" for which in ("query", "key", "value")]
        packed = mappings.separate_qkv(sd, qkv, f"{mk}.attn", bias=True)
        out[f"{mk}.attn.W_qkv_global"] = packed[f"{mk}.attn.W_qkv"]
        out[f"{mk}.attn.b_qkv_global"] = packed[f"{mk}.attn.b_qkv"]
    return out
