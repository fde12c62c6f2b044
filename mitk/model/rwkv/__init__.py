"""RWKV-4 layers: time mixing (the WKV recurrence), channel mixing, their block and state."""

from mitk.model.rwkv.block import RWKVBlock, rwkv_norm
from mitk.model.rwkv.channel_mix import ChannelMixer
from mitk.model.rwkv.state import RWKVState
from mitk.model.rwkv.time_mix import TimeMixer
from mitk.model.rwkv.wkv import WKVStates, chunked_wkv, wkv_readout, wkv_states

__all__ = [
    "ChannelMixer", "RWKVBlock", "RWKVState", "TimeMixer", "WKVStates", "chunked_wkv",
    "rwkv_norm", "wkv_readout", "wkv_states",
]  # fmt: skip
