"""The hookable transformer: components, forward, loading and saving."""

from mitk.model.attention import Attention
from mitk.model.block import TransformerBlock
from mitk.model.encoder_decoder import HookedEncoderDecoder
from mitk.model.encoder_decoder_config import EncoderDecoderConfig
from mitk.model.factored_matrix import FactoredMatrix
from mitk.model.forward_context import ForwardContext
from mitk.model.kv_cache import KVCache
from mitk.model.pretrained import supported_architectures
from mitk.model.pretrained.embedded import embedded_models
from mitk.model.tokenization import NoTokenizerError
from mitk.model.transformer import HookedTransformer

__all__ = [
    "Attention",
    "EncoderDecoderConfig",
    "FactoredMatrix",
    "ForwardContext",
    "HookedEncoderDecoder",
    "HookedTransformer",
    "KVCache",
    "NoTokenizerError",
    "TransformerBlock",
    "embedded_models",
    "supported_architectures",
]
