"""The KL from a reference distribution: the textbook sum in float64 is the oracle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch import Tensor

from mitk.analysis.patching.kl import NextTokenReference


def _textbook(reference: Tensor, logits: Tensor) -> Tensor:
    log_p = reference.double().log_softmax(-1)
    return (log_p.exp() * (log_p - logits.double().log_softmax(-1))).sum(-1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    vocab=st.integers(2, 3000),
    spread=st.floats(0.1, 8.0),
    nudge=st.floats(1e-4, 3.0),
)
def test_kl_matches_the_float64_sum(seed: int, vocab: int, spread: float, nudge: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    reference = spread * torch.randn(2, 3, vocab, generator=gen)
    logits = reference + nudge * torch.randn(4, 2, 3, vocab, generator=gen)
    expected = _textbook(reference, logits)
    got = NextTokenReference(reference).kl(logits)
    assert got.shape == (4, 2, 3) and got.dtype == torch.float32
    assert (got >= 0).all()
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-4)


def test_small_kls_keep_their_digits_on_a_50k_vocabulary() -> None:
    gen = torch.Generator().manual_seed(0)
    reference = 3 * torch.randn(8, 50257, generator=gen)
    logits = reference + 0.05 * torch.randn(2, 8, 50257, generator=gen)
    expected = _textbook(reference, logits)  # about 1e-3
    got = NextTokenReference(reference).kl(logits).double()
    assert float((got - expected).abs().max()) < 1e-6  # LSE - sum p z + sum p log p: 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("vocab", [50, 50257])
def test_identical_logits_give_zero_to_a_rounding(dtype: torch.dtype, vocab: int) -> None:
    reference = (3 * torch.randn(3, vocab)).to(dtype)
    got = NextTokenReference(reference).kl(reference.expand(4, 3, vocab))
    assert got.dtype == torch.promote_types(dtype, torch.float32)  # bfloat16 is read as float32
    assert float(got.max()) < (5e-7 if dtype != torch.float64 else 1e-15)


def test_the_gradient_is_the_textbook_one() -> None:
    gen = torch.Generator().manual_seed(1)
    reference = torch.randn(2, 40, generator=gen, dtype=torch.float64)
    logits = (reference + torch.randn(3, 2, 40, generator=gen, dtype=torch.float64)).float()
    ours = logits.clone().requires_grad_(True)
    NextTokenReference(reference).kl(ours).sum().backward()
    theirs = logits.double().requires_grad_(True)
    _textbook(reference, theirs).sum().backward()
    assert ours.grad is not None and theirs.grad is not None
    torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-6, rtol=1e-4)
    assert not ours.grad.isnan().any()


@pytest.mark.parametrize("shape", [(3, 41), (3, 2, 40), (40,)])
def test_logits_of_another_shape_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="do not end in the reference's shape"):
        NextTokenReference(torch.randn(3, 40)).kl(torch.randn(*shape))


def test_runs_that_moved_their_mass_elsewhere_are_exact_too() -> None:
    # q puts its mass where p has almost none: sum p e^{d - max d} is tiny
    reference = torch.tensor([[9.0, 0.0, -3.0, 1.0]])
    logits = torch.tensor([[[-9.0, 0.0, 4.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]])
    got = NextTokenReference(reference).kl(logits).double()
    torch.testing.assert_close(got, _textbook(reference, logits), atol=1e-6, rtol=1e-6)
