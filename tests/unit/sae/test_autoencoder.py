"""SparseAutoencoder maps, sparse codes and losses against direct dense formulas."""

from __future__ import annotations

import json

import pytest
import torch

from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae import SAEConfig, SparseAutoencoder
from mitk.sae.codes import batch_topk_codes, jumprelu, step, topk_codes
from mitk.sae.geometric_median import geometric_median
from mitk.sae.losses import sae_loss

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def make(arch: str, **kw: object) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=12, d_sae=40, architecture=arch, k=5, total_tokens=64, batch_size=32,
                    **kw)  # type: ignore[arg-type]  # fmt: skip
    sae = SparseAutoencoder(cfg).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        if arch == "batchtopk":
            sae.batch_threshold.fill_(0.05)
    return sae


def dense_reference(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Latents written straight from each paper's definition."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    arch, k = sae.cfg.architecture, sae.cfg.k
    if arch == "relu":
        return pre.relu()
    if arch == "jumprelu":
        return pre * (pre > sae.threshold)
    if arch == "batchtopk":
        return pre * (pre > sae.batch_threshold)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_the_definitions(arch: str) -> None:
    sae = make(arch)
    x = torch.randn(2, 7, 12, dtype=torch.float64)  # leading axes are kept
    latents = sae.encode(x)
    assert latents.shape == (2, 7, 40)
    torch.testing.assert_close(latents, dense_reference(sae, x), rtol=0, atol=1e-12)
    recon, out_latents = sae(x)
    torch.testing.assert_close(recon, latents @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out_latents, latents)
    if arch == "topk":
        assert ((latents != 0).sum(-1) <= 5).all()


def test_topk_codes_and_sparse_decode_equal_dense() -> None:
    sae = make("topk")
    x = torch.randn(9, 12, dtype=torch.float64)
    codes = topk_codes(sae.pre_activations(x), 5)
    dense = codes.to_dense()
    torch.testing.assert_close(dense, dense_reference(sae, x))
    torch.testing.assert_close(sae.decode_codes(codes), sae.decode(dense))


def test_batch_topk_picks_the_largest_of_the_whole_batch() -> None:
    pre = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    codes = batch_topk_codes(pre, 3)
    dense = codes.to_dense()
    relu = pre.relu()
    cutoff = relu.flatten().topk(18).values.min()
    torch.testing.assert_close(dense, relu * (relu >= cutoff))
    assert codes.values.numel() == 18
    counts = (dense != 0).sum(-1)
    assert counts.sum() == 18 and counts.max() > counts.min()  # rows get different counts
    assert torch.equal(codes.row_ids(), torch.repeat_interleave(torch.arange(6), counts))


def test_sparse_decode_gradients_equal_dense() -> None:
    sae = make("topk")
    x = torch.randn(9, 12, dtype=torch.float64)
    sparse = sae.decode_codes(topk_codes(sae.pre_activations(x), 5)).pow(2).sum()
    grads_sparse = torch.autograd.grad(sparse, list(sae.parameters()))
    dense = sae.decode(dense_reference(sae, x)).pow(2).sum()
    grads_dense = torch.autograd.grad(dense, list(sae.parameters()))
    for a, b in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(a, b)


def test_jumprelu_pseudo_derivatives() -> None:
    z = torch.tensor([[0.10, 0.2005, 0.50], [0.1996, 0.30, 0.0]], dtype=torch.float64)
    theta = torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64, requires_grad=True)
    eps = 0.002
    out = jumprelu(z, theta, eps)
    torch.testing.assert_close(out, z * (z > 0.2))
    (grad,) = torch.autograd.grad(out.sum(), theta)
    # only (0, 1) and (1, 0) lie within eps/2 of the threshold: d/dtheta = -theta/eps each
    torch.testing.assert_close(grad, torch.tensor([-0.2 / eps, -0.2 / eps, 0.0]).double())
    (grad_l0,) = torch.autograd.grad(step(z, theta, eps).sum(), theta)
    torch.testing.assert_close(grad_l0, torch.tensor([-500.0, -500.0, 0.0]).double())


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_an_input_scale_keeps_latents_and_rescales_output(arch: str) -> None:
    sae = make(arch)
    x = torch.randn(8, 12, dtype=torch.float64)
    scale = 3.7
    recon, latents = sae(x * scale)
    sae.fold_input_scale_(scale)
    recon_raw, latents_raw = sae(x)
    torch.testing.assert_close(latents_raw, latents)
    torch.testing.assert_close(recon_raw, recon / scale)


def test_decoder_norm_helpers() -> None:
    sae = make("topk")
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(40, dtype=torch.float64))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-12


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_match_their_formulas(arch: str) -> None:
    sae = make(arch, l1_coefficient=0.3, l0_coefficient=0.2)
    x = torch.randn(16, 12, dtype=torch.float64)
    parts = sae_loss(sae, x, sparsity_scale=0.5)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "batchtopk":
        latents = batch_topk_codes(pre, 5).to_dense()
    elif arch == "topk":
        latents = dense_reference(sae, x)
    else:
        latents = dense_reference(sae, x)
    recon = latents @ sae.W_dec + sae.b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.reconstruction, recon)
    expected_sparsity = {
        "relu": 0.5 * 0.3 * (latents * sae.W_dec.norm(dim=-1)).sum(-1).mean(),
        "jumprelu": 0.5 * 0.2 * (latents != 0).double().sum(-1).mean(),
    }.get(arch, torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(parts.sparsity, expected_sparsity)
    assert torch.equal(parts.fire_counts, (latents > 0).sum(0))
    torch.testing.assert_close(parts.loss.detach(), mse + expected_sparsity)


def test_auxk_loss_uses_only_dead_latents() -> None:
    sae = make("topk")
    x = torch.randn(16, 12, dtype=torch.float64)
    none_dead = sae_loss(sae, x, dead=torch.zeros(40, dtype=torch.bool))
    assert none_dead.aux == 0
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:10] = True
    parts = sae_loss(sae, x, dead=dead)
    assert parts.aux > 0
    parts.loss.backward()
    # the aux loss trains the dead latents' encoder columns, even those outside the top k
    assert sae.W_enc.grad is not None and sae.W_enc.grad[:, :10].abs().sum() > 0


def test_geometric_median_is_robust_and_optimal() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    points[:20] += 100.0  # outliers drag the mean, not the median
    median = geometric_median(points)

    def cost(c: torch.Tensor) -> float:
        return float((points - c).norm(dim=-1).sum())

    assert median.norm() < 1.0 < points.mean(0).norm()
    for _ in range(20):
        assert cost(median) <= cost(median + 0.01 * torch.randn(3, generator=gen).double())


def test_config_round_trips_and_validates() -> None:
    cfg = SAEConfig(d_in=8, d_sae=32, architecture="jumprelu", hook_name="blocks.0.hook_resid_pre")
    assert SAEConfig.from_json(cfg.to_json()) == cfg
    assert cfg.decoder_init_norm == 1.0 and cfg.aux_k == 4
    assert SAEConfig(d_in=8, d_sae=32, architecture="relu").decoder_init_norm == 0.1
    with pytest.raises(ConfigError, match="architecture must be one of"):
        SAEConfig(d_in=8, d_sae=32, architecture="abstopk")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="k=64 exceeds d_sae=32"):
        SAEConfig(d_in=8, d_sae=32, k=64)
    with pytest.raises(ConfigError, match="less than one batch"):
        SAEConfig(d_in=8, d_sae=32, batch_size=100, total_tokens=10)
    with pytest.raises(ConfigError, match="unknown SAEConfig field"):
        SAEConfig.from_json(json.dumps({**cfg.to_dict(), "l2": 1}))
    with pytest.raises(ConfigError, match=r"lr must be( a)? finite"):
        SAEConfig(d_in=8, d_sae=32, lr=float("nan"))


def test_bad_inputs_name_the_problem() -> None:
    sae = make("relu")
    with pytest.raises(ShapeMismatchError, match="width 11, this SAE has d_in=12"):
        sae.encode(torch.randn(3, 11, dtype=torch.float64))
    with pytest.raises(ShapeMismatchError, match="d_sae=40"):
        sae.decode(torch.randn(3, 39, dtype=torch.float64))
    untrained = SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="batchtopk", k=2))
    with pytest.raises(RuntimeError, match="no inference threshold"):
        untrained.encode(torch.randn(2, 4))


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_gathered_and_dense_losses_agree(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mitk.sae.losses as losses

    sae = make(arch, l1_coefficient=0.3, l0_coefficient=0.2, jumprelu_bandwidth=0.5)
    x = torch.randn(16, 12, dtype=torch.float64)
    results = []
    for density in (0.0, 1.0):  # 0: always dense; 1: always gathered
        monkeypatch.setattr(losses, "SPARSE_DENSITY", density)
        parts = sae_loss(sae, x, sparsity_scale=0.7)
        grads = torch.autograd.grad(parts.loss, list(sae.parameters()))
        results.append((parts, grads))
    (dense, dense_grads), (gathered, gathered_grads) = results
    for name in ("loss", "mse", "sparsity", "reconstruction", "min_active"):
        torch.testing.assert_close(getattr(gathered, name), getattr(dense, name), msg=name)
    assert torch.equal(gathered.fire_counts, dense.fire_counts)
    for a, b in zip(gathered_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b)
    if arch == "jumprelu":  # the threshold's pseudo-gradient was exercised
        assert dense_grads[-1].abs().sum() > 0


def test_dictionary_shape_fields_are_checked() -> None:
    matryoshka = SAEConfig(d_in=8, d_sae=64, architecture="matryoshka_batchtopk", k=4)
    assert matryoshka.matryoshka_widths == (8, 16, 32, 64)
    assert SAEConfig.from_json(matryoshka.to_json()) == matryoshka
    with pytest.raises(ConfigError, match="end at d_sae=64"):
        matryoshka.replace(matryoshka_widths=[8, 32])
    with pytest.raises(ConfigError, match="increase strictly"):
        matryoshka.replace(matryoshka_widths=[32, 8, 64])
    with pytest.raises(ConfigError, match="only to architecture='matryoshka_batchtopk'"):
        SAEConfig(d_in=8, d_sae=64, matryoshka_widths=(8, 64))
    with pytest.raises(ConfigError, match="d_out=4 differs from d_in=8"):
        SAEConfig(d_in=8, d_sae=64, d_out=4)
    with pytest.raises(ConfigError, match="skip_connection needs a transcoder"):
        SAEConfig(d_in=8, d_sae=64, skip_connection=True)
    with pytest.raises(ConfigError, match="that is an SAE"):
        SAEConfig(d_in=8, d_sae=64, hook_name="a", target_hook_name="a")
    transcoder = SAEConfig(d_in=8, d_sae=64, d_out=4, hook_name="a", target_hook_name="b")
    assert transcoder.is_transcoder and not matryoshka.is_transcoder
    assert SAEConfig(d_in=8, d_sae=64).d_out == 8
