"""Hand-written SAE backward passes against dense formulas and autograd's own gradients."""

from __future__ import annotations

import pytest
import torch

from mitk.sae.codes import batch_topk_codes, jumprelu, step
from mitk.sae.dense_ops import column_counts, relu_decode
import mitk.sae.losses as losses
from mitk.sae.sparse_ops import SparsePattern, gathered_pre_activations, sparse_decode

from .test_autoencoder import make

F64 = torch.float64


def random_pattern(
    n_rows: int, d_sae: int, density: float, seed: int
) -> tuple[SparsePattern, torch.Tensor]:
    """A pattern and its 0/1 dense mask; row 1 and latent 2 are left empty on purpose."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, d_sae, generator=gen) < density
    mask[1, :] = False
    mask[:, 2] = False
    rows, latents = mask.nonzero().unbind(1)
    return SparsePattern(rows, latents, n_rows, d_sae), mask


def test_pattern_products_equal_dense_products() -> None:
    pattern, mask = random_pattern(9, 13, 0.3, seed=0)
    values = torch.randn(pattern.nnz, dtype=F64)
    dense = torch.zeros(9, 13, dtype=F64)
    dense[mask] = values
    table, weights = torch.randn(9, 5, dtype=F64), torch.randn(13, 5, dtype=F64)
    torch.testing.assert_close(pattern.per_latent_sum(values, table), dense.t() @ table)
    torch.testing.assert_close(pattern.times(values, weights), dense @ weights)
    torch.testing.assert_close(pattern.sampled_matmul(table, weights), (table @ weights.t())[mask])
    rows, latents = pattern.by_latent[1], pattern.latents[pattern.by_latent[0]]
    assert (latents.diff() >= 0).all() and torch.equal(rows, pattern.rows[pattern.by_latent[0]])


@pytest.mark.parametrize("density", [0.0, 0.4])
def test_gathered_encoder_and_sparse_decode_have_exact_gradients(density: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x, W_enc = (
        torch.randn(7, 4, dtype=F64, generator=gen),
        torch.randn(4, 11, dtype=F64, generator=gen),
    )
    bias, W_dec = (
        torch.randn(11, dtype=F64, generator=gen),
        torch.randn(11, 4, dtype=F64, generator=gen),
    )
    pattern, mask = random_pattern(7, 11, density, seed=2)
    inputs = [t.requires_grad_() for t in (x, W_enc, bias, W_dec)]

    def sparse(
        x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, W_dec: torch.Tensor
    ) -> torch.Tensor:
        pre = torch.addmm(bias, x, W_enc)
        return sparse_decode(gathered_pre_activations(x, W_enc, bias, pre, pattern), W_dec, pattern)

    def dense(
        x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, W_dec: torch.Tensor
    ) -> torch.Tensor:
        return (torch.addmm(bias, x, W_enc) * mask) @ W_dec

    assert torch.autograd.gradcheck(sparse, inputs)
    grad = torch.randn(7, 4, dtype=F64)
    got = torch.autograd.grad(sparse(*inputs), inputs, grad)
    want = torch.autograd.grad(dense(*inputs), inputs, grad, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


def test_relu_decode_matches_autograd_on_the_plain_formula() -> None:
    gen = torch.Generator().manual_seed(4)
    pre = torch.randn(6, 9, dtype=F64, generator=gen).requires_grad_()
    W_dec = torch.randn(9, 5, dtype=F64, generator=gen).requires_grad_()
    norms = W_dec.detach().norm(dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(relu_decode, (pre, W_dec, norms))
    out, penalty = relu_decode(pre, W_dec, W_dec.norm(dim=-1))
    loss = out.pow(2).sum() + 0.7 * penalty
    plain = pre.relu()
    ref = (plain @ W_dec).pow(2).sum() + 0.7 * (plain * W_dec.norm(dim=-1)).sum()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(
        torch.autograd.grad(loss, (pre, W_dec)), torch.autograd.grad(ref, (pre, W_dec)), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(7, 16), (255, 8), (600, 24), (511, 13), (1000, 40)])
def test_column_counts_equal_a_plain_sum(shape: tuple[int, int]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.9
    assert torch.equal(column_counts(mask), mask.sum(0))
    assert torch.equal(column_counts(mask.t().contiguous().t()), mask.sum(0))  # strided input


def test_column_counts_cannot_carry_between_columns() -> None:
    mask = torch.ones(1020, 16, dtype=torch.bool)  # every byte lane at its 255 maximum
    mask[:, 3] = False
    assert torch.equal(column_counts(mask), mask.sum(0))


def plain_loss(sae: torch.nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Each architecture's training loss written directly, for autograd to differentiate."""
    cfg = sae.cfg
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cfg.architecture == "relu":
        latents = pre.relu()
        sparsity = cfg.l1_coefficient * (latents * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    elif cfg.architecture == "jumprelu":
        latents = jumprelu(pre, sae.threshold, cfg.jumprelu_bandwidth)
        sparsity = (
            cfg.l0_coefficient * step(pre, sae.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        )
    elif cfg.architecture == "topk":
        top = pre.topk(cfg.k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        sparsity = torch.zeros((), dtype=x.dtype)
    else:
        latents = batch_topk_codes(pre, cfg.k).to_dense()
        sparsity = torch.zeros((), dtype=x.dtype)
    recon = latents @ sae.W_dec + sae.b_dec
    return (recon - x).pow(2).sum(-1).mean() + scale * sparsity


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["dense", "gathered"])
def test_training_loss_gradients_equal_autograd_on_the_plain_formula(
    arch: str, density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "SPARSE_DENSITY", density)
    sae = make(arch, l1_coefficient=0.3, l0_coefficient=0.2, jumprelu_bandwidth=0.5)
    x = torch.randn(16, 12, dtype=F64, generator=torch.Generator().manual_seed(6))
    params = [p for p in sae.parameters() if p.requires_grad]
    parts = losses.sae_loss(sae, x, sparsity_scale=0.7)
    reference = plain_loss(sae, x, 0.7)
    torch.testing.assert_close(parts.loss, reference)
    got = torch.autograd.grad(parts.loss, params)
    want = torch.autograd.grad(reference, params)
    for name, a, b in zip([n for n, _ in sae.named_parameters()], got, want, strict=True):
        torch.testing.assert_close(a, b, msg=name)
        assert a.abs().sum() > 0, name  # every parameter was really exercised


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["dense", "gathered"])
def test_half_precision_training_follows_float64(
    dtype: torch.dtype, arch: str, density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half-precision SAEs train too (some sparse kernels only exist in float32 on CPU)."""
    monkeypatch.setattr(losses, "SPARSE_DENSITY", density)
    exact = make(arch, l1_coefficient=0.3)
    half = make(arch, l1_coefficient=0.3).to(dtype)
    x = torch.randn(16, 12, dtype=F64, generator=torch.Generator().manual_seed(7))
    exact_grads = torch.autograd.grad(losses.sae_loss(exact, x).loss, list(exact.parameters()))
    half_grads = torch.autograd.grad(
        losses.sae_loss(half, x.to(dtype)).loss, list(half.parameters())
    )
    for a, b in zip(half_grads, exact_grads, strict=True):
        assert a.dtype == dtype
        cosine = torch.nn.functional.cosine_similarity(a.double().flatten(), b.flatten(), dim=0)
        assert cosine > 0.95  # bf16 rounding can flip a near-tied top-k pick
