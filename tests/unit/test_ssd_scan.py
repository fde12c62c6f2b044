"""Mamba-2's chunked scan (``ssd_scan``) against the recurrence written out, and the mixer
paths that use it over several chunks: hooked states, carried state, left padding."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.config import SSMConfig
from mitk.hooks import name
from mitk.model.kv_cache import KVCache
from mitk.model.ssm.mixer import CHUNKED, SEQUENTIAL
from mitk.model.ssm.ssd import CHUNK, segment_sums, ssd_scan

HEADS, HEAD_DIM, GROUPS, N = 6, 4, 2, 5
VOCAB = 40


def _reference(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``H_t = e^{dt_t A} H_{t-1} + dt_t x_t B_t^T``, ``y_t = H_t C_t``, one position at a time."""
    per_group = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(per_group, 2), C.repeat_interleave(per_group, 2)
    ys = []
    for t in range(x.shape[1]):
        step = dt[:, t, :, None, None]
        h = (step * A[:, None, None]).exp() * h + step * x[:, t, :, :, None] * B[:, t, :, None]
        ys.append((h * C[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def _inputs(pos: int, dt_scale: float, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    b = 2
    x = torch.randn(b, pos, HEADS, HEAD_DIM, generator=gen)
    dt = torch.rand(b, pos, HEADS, generator=gen) * dt_scale
    A = -torch.rand(HEADS, generator=gen) * 8
    B = torch.randn(b, pos, GROUPS, N, generator=gen)
    C = torch.randn(b, pos, GROUPS, N, generator=gen)
    h0 = torch.randn(b, HEADS, HEAD_DIM, N, generator=gen)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize(("chunk", "block"), [(1, None), (3, None), (8, 16), (7, 21), (16, None),
                                              (64, None)])  # fmt: skip
@pytest.mark.parametrize("dt_scale", [0.1, 3.0])  # 3.0: a chunk's decay passes e^-88 (fp32's)
@pytest.mark.parametrize("carried", [False, True])
def test_ssd_scan_equals_the_recurrence_in_float64(
    chunk: int, block: int | None, dt_scale: float, carried: bool
) -> None:
    x, dt, A, B, C, h0 = _inputs(37, dt_scale, seed=chunk)  # 37: no chunk size divides it
    start = h0 if carried else None
    y, last = ssd_scan(x, dt, A, B, C, start, chunk=chunk, block=block)
    zero = torch.zeros_like(h0)
    y_ref, last_ref = _reference(*(t.double() for t in (x, dt, A, B, C, h0 if carried else zero)))
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(last.double(), last_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dt_scale", [1.0, 60.0])  # 60.0: decays flushed to 0, even in fp64
def test_ssd_scan_gradients_equal_the_recurrences(dt_scale: float) -> None:
    inputs = [t.double().requires_grad_() for t in _inputs(23, dt_scale, seed=4)]
    x, dt, A, B, C, h0 = inputs
    y, last = ssd_scan(x, dt, A, B, C, h0, chunk=5)
    weights = torch.randn_like(y), torch.randn_like(last)
    grads = torch.autograd.grad((y * weights[0]).sum() + (last * weights[1]).sum(), inputs)
    y_ref, last_ref = _reference(*inputs)
    expected = torch.autograd.grad(
        (y_ref * weights[0]).sum() + (last_ref * weights[1]).sum(), inputs
    )
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, atol=1e-9, rtol=1e-9)


def test_ssd_scan_of_no_positions_returns_the_state() -> None:
    x, dt, A, B, C, h0 = _inputs(9, 1.0, seed=0)
    y, last = ssd_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], h0)
    assert y.shape == (2, 0, HEADS, HEAD_DIM)
    torch.testing.assert_close(last, h0)


def test_segment_sums_are_summed_per_segment_not_differenced() -> None:
    # a large first step: running sums sit near -1e6, where fp32's spacing is 0.06, so
    # their differences would lose the small steps that follow; direct sums keep them
    a = torch.tensor([-1e6, -1e-3, -2e-3, -4e-3])
    sums = segment_sums(a)  # [from j, through t]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for j in range(4):
        for t in range(j, 4):
            expected[j, t] = a[j + 1 : t + 1].double().sum()
    torch.testing.assert_close(sums.double(), expected, atol=0, rtol=1e-6)


def _mamba2() -> HookedTransformer:
    ssm = SSMConfig(variant="mamba2", d_inner=HEADS * HEAD_DIM, d_state=N, d_conv=4, dt_rank=3,
                    n_heads=HEADS, n_groups=GROUPS)  # fmt: skip
    cfg = TransformerConfig(
        d_model=12, n_layers=2, n_heads=1, d_vocab=VOCAB, n_ctx=1024, d_mlp=0,
        positional="none", normalization="rmsnorm", act_fn="silu", ssm=ssm,
    )  # fmt: skip
    model = HookedTransformer(cfg, seed=5)
    with torch.no_grad():  # larger than the init's, so that every part of the mixer matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def mamba2() -> HookedTransformer:
    return _mamba2()


POS = 2 * CHUNK + 19  # three chunks, the last one partial


def _tokens(pos: int = POS, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, pos), generator=torch.Generator().manual_seed(seed))


def test_chunked_mixer_equals_the_hooked_sequential_states(mamba2: HookedTransformer) -> None:
    tokens = _tokens()
    with torch.no_grad():
        fast = mamba2(tokens)
        assert mamba2.attention_paths() == [CHUNKED, CHUNKED]
        slow, cache = mamba2.run_with_cache(tokens, names_filter=name("ssm_state", 1))
        assert mamba2.attention_paths() == [CHUNKED, SEQUENTIAL]
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    assert cache[name("ssm_state", 1)].shape == (2, POS, HEADS * HEAD_DIM, N)


def test_carried_state_over_chunks_equals_the_full_forward(mamba2: HookedTransformer) -> None:
    tokens = _tokens()
    split = CHUNK + 5  # the prefix ends inside the second chunk
    cache = KVCache(mamba2.cfg.n_layers)
    with torch.no_grad():
        full = mamba2(tokens)
        parts = [mamba2(tokens[:, :split], past_kv_cache=cache)]
        parts.append(mamba2(tokens[:, split : split + CHUNK + 3], past_kv_cache=cache))
        for t in range(split + CHUNK + 3, POS):
            parts.append(mamba2(tokens[:, t : t + 1], past_kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_left_padding_over_chunks_equals_each_row_alone(mamba2: HookedTransformer) -> None:
    tokens = _tokens(pos=CHUNK + 9)
    pad = CHUNK - 3  # the real tokens start near the end of the first chunk
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), tokens], 1)
    mask = torch.cat([torch.zeros(2, pad), torch.ones(2, tokens.shape[1])], 1).long()
    with torch.no_grad():
        alone = mamba2(tokens)
        with_pad = mamba2(padded, attention_mask=mask)
    torch.testing.assert_close(with_pad[:, pad:], alone, atol=1e-5, rtol=0)
