"""The hookable transformer: components, forward, loading and saving."""

from mitk.model.attention import Attention
from mitk.model.block import TransformerBlock
from mitk.model.encoder_decoder import HookedEncoderDecoder
from mitk.model.encoder_decoder_config import EncoderDecoderConfig
from mitk.model.factored_matrix import FactoredMatrix
from mitk.model.forward_context import ForwardContext
from mitk.model.generation import GenerationArgumentError, GenerationResult
from mitk.model.kv_cache import KVCache
from mitk.model.pretrained import supported_architectures
from mitk.model.pretrained.embedded import embedded_models
from mitk.model.tokenization import (
    NotASingleTokenError,
    NoTokenizerError,
    TokenNotFoundError,
    get_attention_mask,
)
from mitk.model.transformer import HookedTransformer, LogitsAndLoss

__all__ = [
    "Attention",
    "EncoderDecoderConfig",
    "FactoredMatrix",
    "ForwardContext",
    "GenerationArgumentError",
    "GenerationResult",
    "HookedEncoderDecoder",
    "HookedTransformer",
    "KVCache",
    "LogitsAndLoss",
    "NoTokenizerError",
    "NotASingleTokenError",
    "TokenNotFoundError",
    "TransformerBlock",
    "embedded_models",
    "get_attention_mask",
    "supported_architectures",
]
