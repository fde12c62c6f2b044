"""Hugging Face BigBird encoders (``BigBirdModel``) to mitk weights.

The layout and weight names are BERT's (``bert.py``: post-norm blocks, word + position +
token-type embeddings through ``ln_embed``, no final norm, a bare encoder; the pooler is
ignored), with ``attention_type="block_sparse"`` as ``BlockSparseConfig`` attention in
every layer (``mitk.model.block_sparse_attention``: Hugging Face's eval-mode numerics,
its fall-back to full attention on short sequences included) and ``"original_full"`` as
plain attention. ``use_bias`` says whether queries, keys and values carry biases;
``rescale_embeddings=True`` (BigBird-Pegasus's scaling) and decoders are refused.
"""

from __future__ import annotations

from typing import Any

from mitk.config import TransformerConfig
from mitk.config.block_sparse import BlockSparseConfig
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import bert, mappings

KNOWN_FIELDS = frozenset({
    *bert.KNOWN_FIELDS, "attention_type", "use_bias", "rescale_embeddings", "block_size",
    "num_random_blocks",
})  # fmt: skip
"""``config.json`` fields the conversion reads or knows to be inert; others are refused."""


def big_bird_config(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig equivalent to a BigBird ``config.json``."""
    mappings.refuse_unknown_fields(hf, KNOWN_FIELDS)
    if hf.get("rescale_embeddings"):
        raise UnsupportedModelError("big_bird rescale_embeddings=True is not supported")
    kind = hf.get("attention_type", "block_sparse")
    if kind not in ("block_sparse", "original_full"):
        raise UnsupportedModelError(f"big_bird attention_type {kind!r} is not supported")
    sparse = None
    if kind == "block_sparse":
        sparse = BlockSparseConfig(
            block_size=hf.get("block_size", 64), random_blocks=hf.get("num_random_blocks", 3)
        )
    # the fields BERT shares, with BigBird's defaults where a config.json leaves them out
    shared = {k: v for k, v in hf.items() if k in bert.KNOWN_FIELDS or k == "model_type"}
    shared = {"hidden_act": "gelu_new", **shared}
    return bert.bert_config(
        shared,
        block_sparse=sparse,
        attn_qkv_bias=bool(hf.get("use_bias", True)),
        architecture="big_bird",
        extra={"source_model_type": "big_bird"},
        **overrides,
    )


big_bird_state_dict = bert.bert_state_dict
"""A ``BigBirdModel`` state dict is laid out as BERT's (``use_bias`` read into the config)."""
