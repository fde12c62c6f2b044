"""Gated SAEs, Matryoshka BatchTopK and (skip-)transcoders against plain dense formulas.

Each oracle below is written from the paper's definition with dense float64
tensors; the library's losses (sparse or dense paths) must give the same loss
and the same gradient for every parameter.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from mitk.errors import ShapeMismatchError
from mitk.sae import SAEConfig, SparseAutoencoder
from mitk.sae.codes import SparseCodes
import mitk.sae.losses as losses
from mitk.sae.losses import sae_loss
from mitk.sae.matryoshka import prefix_reconstructions

D_IN, D_SAE, D_OUT, K = 12, 40, 7, 5
TRANSCODER = {"hook_name": "a", "target_hook_name": "b", "d_out": D_OUT}
SKIP = {**TRANSCODER, "skip_connection": True}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gated": ("gated", {}),
    "gated-no-b_dec-input": ("gated", {"apply_b_dec_to_input": False}),
    "gated-skip-transcoder": ("gated", SKIP),
    "matryoshka": ("matryoshka_batchtopk", {"matryoshka_widths": (3, 10, 25, D_SAE)}),
    "matryoshka-default-widths": ("matryoshka_batchtopk", {}),
    "matryoshka-skip-transcoder": ("matryoshka_batchtopk", SKIP),
    "relu-transcoder": ("relu", TRANSCODER),
    "relu-skip-transcoder": ("relu", SKIP),
    "topk-skip-transcoder": ("topk", SKIP),
    "batchtopk-transcoder": ("batchtopk", TRANSCODER),
    # a narrow kernel: no entry within it, so the oracle needs no pseudo-derivative
    "jumprelu-skip-transcoder": ("jumprelu", {**SKIP, "jumprelu_bandwidth": 1e-6}),
}


def make(arch: str, **kw: Any) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K, total_tokens=64,  # type: ignore[arg-type]
                    batch_size=32, l1_coefficient=0.3, l0_coefficient=0.2, **kw)  # fmt: skip
    sae = SparseAutoencoder(cfg).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
        if cfg.batch_level_k:
            sae.batch_threshold.fill_(0.05)
    return sae


def centred(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    cfg = sae.cfg
    return x - sae.b_dec if cfg.apply_b_dec_to_input and not cfg.is_transcoder else x


def skip_term(sae: SparseAutoencoder, x: Tensor) -> Tensor | float:
    return x @ sae.W_skip.T if sae.cfg.skip_connection else 0.0


def oracle_latents(sae: SparseAutoencoder, x: Tensor, training: bool) -> Tensor:
    """Latents from each paper's definition (training: BatchTopK picks over the batch)."""
    cfg, c = sae.cfg, centred(sae, x)
    if cfg.architecture == "gated":
        gate = c @ sae.W_enc + sae.b_gate
        magnitude = c @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        return (gate > 0) * magnitude.relu()
    pre = c @ sae.W_enc + sae.b_enc
    if cfg.architecture == "relu":
        return pre.relu()
    if cfg.architecture == "jumprelu":
        return pre * (pre > sae.threshold)
    if cfg.architecture == "topk":
        top = pre.topk(cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    if not training:
        return pre * (pre > sae.batch_threshold)
    relu = pre.relu()
    cutoff = relu.flatten().topk(x.shape[0] * cfg.k).values.min()
    return relu * (relu >= cutoff)


def oracle_loss(sae: SparseAutoencoder, x: Tensor, y: Tensor, scale: float, dead: Tensor) -> Tensor:
    cfg = sae.cfg
    f = oracle_latents(sae, x, training=True)
    skip = skip_term(sae, x)

    def error(recon: Tensor) -> Tensor:
        return (recon - y).pow(2).sum(-1).mean()

    recon = f @ sae.W_dec + sae.b_dec + skip
    loss = error(recon)
    if cfg.architecture == "gated":
        gate = (centred(sae, x) @ sae.W_enc + sae.b_gate).relu()
        loss = loss + scale * cfg.l1_coefficient * (gate * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        frozen = gate @ sae.W_dec.detach() + sae.b_dec.detach()
        loss = loss + error(frozen + (skip.detach() if isinstance(skip, Tensor) else skip))
    elif cfg.architecture == "relu":
        loss = loss + scale * cfg.l1_coefficient * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    elif cfg.architecture == "jumprelu":
        loss = loss + scale * cfg.l0_coefficient * (f != 0).double().sum(-1).mean()
    if cfg.architecture == "matryoshka_batchtopk":
        for width in cfg.matryoshka_widths[:-1]:
            loss = loss + error(f[:, :width] @ sae.W_dec[:width] + sae.b_dec + skip)
    if cfg.uses_k and dead.any():  # AuxK: the top dead latents explain the residual
        pre = centred(sae, x) @ sae.W_enc + sae.b_enc
        top = pre.masked_fill(~dead, float("-inf")).topk(min(cfg.aux_k, int(dead.sum())), dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        residual = y - recon.detach()
        spread = (residual - residual.mean(0)).pow(2).sum()
        loss = loss + cfg.aux_coefficient * (codes @ sae.W_dec - residual).pow(2).sum() / spread
    return loss


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["dense", "gathered"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_the_formula(
    case: str, density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "SPARSE_DENSITY", density)  # both loss paths (where there are two)
    arch, kw = CASES[case]
    sae = make(arch, **kw)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(16, sae.cfg.d_out, generator=gen, dtype=torch.float64)
    y = y if sae.cfg.is_transcoder else x
    dead = torch.arange(D_SAE) % 3 == 0
    params = [p for p in sae.parameters()]
    parts = sae_loss(sae, x, 0.5, dead, target=y if sae.cfg.is_transcoder else None)
    expected = oracle_loss(sae, x, y, 0.5, dead)
    torch.testing.assert_close(parts.loss, expected)
    recon = oracle_latents(sae, x, training=True) @ sae.W_dec + sae.b_dec + skip_term(sae, x)
    torch.testing.assert_close(parts.reconstruction, recon.detach())
    torch.testing.assert_close(parts.mse, (recon - y).pow(2).sum(-1).mean().detach())
    fired = (oracle_latents(sae, x, training=True) > 0).sum(0)
    assert torch.equal(parts.fire_counts, fired)
    got = torch.autograd.grad(parts.loss, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    names = [name for name, _ in sae.named_parameters()]
    for name, a, b in zip(names, got, want, strict=True):
        a = torch.zeros_like(dict(sae.named_parameters())[name]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]


@pytest.mark.parametrize("case", list(CASES))
def test_encode_and_forward_match_the_definitions(case: str) -> None:
    arch, kw = CASES[case]
    sae = make(arch, **kw)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)  # leading axes are kept
    latents = sae.encode(x)
    flat = x.reshape(-1, D_IN)
    expected = oracle_latents(sae, flat, training=False).view(2, 5, D_SAE)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-12)
    assert (latents != 0).any() and (latents == 0).any()
    recon, _ = sae(x)
    assert recon.shape == (2, 5, sae.cfg.d_out)
    torch.testing.assert_close(recon, latents @ sae.W_dec + sae.b_dec + skip_term(sae, x))


def test_gated_parameters_are_saelens_s() -> None:
    names = {name for name, _ in make("gated").named_parameters()}
    assert names == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}


def test_transcoder_shapes_and_initialisation() -> None:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, hook_name="a", target_hook_name="b",
                    skip_connection=True)  # fmt: skip
    sae = SparseAutoencoder(cfg)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_OUT), "b_enc": (D_SAE,),
                      "b_dec": (D_OUT,), "W_skip": (D_OUT, D_IN)}  # fmt: skip
    assert not sae.W_skip.any()  # the skip starts at zero
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.ones(D_SAE))  # unit encoder rows
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(D_SAE))
    same_width = SparseAutoencoder(SAEConfig(d_in=8, d_sae=64, hook_name="a", target_hook_name="b"))
    # another space: the encoder is not tied to the decoder even when the widths agree
    assert not torch.allclose(same_width.W_enc, same_width.W_dec.T)
    sae_cfg = SparseAutoencoder(SAEConfig(d_in=8, d_sae=64))
    assert torch.equal(sae_cfg.W_enc, sae_cfg.W_dec.T)


def test_transcoder_input_width_check_names_the_hook() -> None:
    sae = make("relu", **TRANSCODER)
    with pytest.raises(ShapeMismatchError, match=r"d_in=12 \(hook a\)"):
        sae.encode(torch.randn(3, D_OUT, dtype=torch.float64))


@pytest.mark.parametrize("case", list(CASES))
def test_folding_input_and_output_scales(case: str) -> None:
    arch, kw = CASES[case]
    sae = make(arch, **kw)
    x = torch.randn(8, D_IN, dtype=torch.float64)
    scale, out_scale = (3.7, 0.6) if sae.cfg.is_transcoder else (3.7, 3.7)
    recon, latents = sae(x * scale)
    sae.fold_input_scale_(scale, out_scale)
    recon_raw, latents_raw = sae(x)
    torch.testing.assert_close(latents_raw, latents)
    torch.testing.assert_close(recon_raw, recon / out_scale)


def test_prefix_reconstructions_equal_dense_prefixes_with_empty_levels() -> None:
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 20, generator=gen, dtype=torch.float64).relu()
    dense[:, 2:9] = 0  # a level with no active latent at all
    dense[3] = 0  # and a row with none
    rows, latents = dense.nonzero(as_tuple=True)
    offsets = torch.searchsorted(rows, torch.arange(6))
    codes = SparseCodes(dense[rows, latents], latents, offsets, 20)
    W_dec = torch.randn(20, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    values = codes.values.clone().requires_grad_()
    widths = (2, 9, 15, 20)
    out = prefix_reconstructions(values, codes.pattern(), W_dec, b_dec, widths)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dense_values = torch.zeros(6, 20, dtype=torch.float64).index_put((rows, latents), values)
    expected = torch.stack([dense_values[:, :w] @ W_dec[:w] + b_dec for w in widths], 1)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad((out * weights).sum(), [values, W_dec, b_dec])
    want = torch.autograd.grad((expected * weights).sum(), [values, W_dec, b_dec])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
