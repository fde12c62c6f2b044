"""Attention sinks: the fused one-extra-key trick equals the explicit softmax with a sink."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from mitk.model.sinks import fused_with_sink, softmax_with_sink


@settings(max_examples=30, deadline=None)
@given(
    kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), q_len=st.integers(1, 5),
    past=st.integers(0, 3), masked=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_fused_sink_attention_equals_the_explicit_softmax(
    kv_heads: int, group: int, q_len: int, past: int, masked: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    heads, k_len, d, scale = kv_heads * group, q_len + past, 4, 0.5
    q = torch.randn(2, heads, q_len, d, generator=gen)
    k = torch.randn(2, kv_heads, k_len, d, generator=gen)
    v = torch.randn(2, kv_heads, k_len, 3, generator=gen)
    sinks = torch.randn(heads, generator=gen) * 2
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(past)[None, None]
    allowed = causal & (torch.rand(2, 1, q_len, k_len, generator=gen) > 0.3) if masked else None
    visible = causal if allowed is None else allowed
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    weights, sink = softmax_with_sink(scores.masked_fill(~visible, float("-inf")), sinks)
    expected = weights @ v.repeat_interleave(group, 1)
    fused = fused_with_sink(q, k, v, allowed, sinks, scale)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1) + sink, torch.ones_like(sink))
