"""LongformerConfig: a sliding window plus global tokens, for ``TransformerConfig.longformer``."""

from __future__ import annotations

from dataclasses import dataclass

from mitk.config.json_config import JsonConfig
from mitk.errors import ConfigError


@dataclass(frozen=True)
class LongformerConfig(JsonConfig):
    """Longformer attention (Beltagy et al. 2020) in every layer of a bidirectional encoder.

    A query sees the keys at most ``attention_window[L] // 2`` positions away on either
    side, plus every global token (chosen per input by ``global_attention_mask``). A
    global token's query instead sees every key, through projections of its own
    (``W_qkv_global``); the keys and values the local queries read of a global token
    are the usual ones. The fused path computes the band in chunks and never builds
    a ``[pos, pos]`` matrix.
    """

    attention_window: list[int]
    """Per layer, the window's full width (even, as Hugging Face's ``attention_window``):
    a query sees the keys up to half of it before and after itself."""

    def __post_init__(self) -> None:
        windows = self.attention_window
        if not isinstance(windows, list) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 and w % 2 == 0 for w in windows
        ):
            raise ConfigError(
                f"longformer attention_window must be a list of positive even ints, got {windows!r}"
            )

    def one_sided(self, layer: int) -> int:
        """How far ``layer``'s window reaches on either side of a query (half its width)."""
        return self.attention_window[layer] // 2
