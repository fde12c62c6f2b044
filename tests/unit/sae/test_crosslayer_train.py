"""train_clt: learns known cross-layer structure, resumes bit-identically, refuses bad sources."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mitk import HookedTransformer
from mitk.checkpoint import CheckpointExistsError
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae import (
    ActivationStore,
    CLTConfig,
    CrossLayerTranscoder,
    NonFiniteError,
    SparseDictionaryData,
    TensorActivations,
    train_clt,
)
from mitk.sae.crosslayer_train import clt_loss
from tests.interrupted import InterruptedSource, KilledError

D_MODEL, N_FEATURES = 16, 24


def cross_layer_data(n: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two layers; layer 1's MLP output is half a map of layer 0's sparse features.

    Layer L's input holds its own sparse features ``c_L`` (3 active of 24 on
    average); ``y_0 = c_0 D_00`` and ``y_1 = c_0 D_01 + c_1 D_11``. Layer 1's input
    says nothing about ``c_0``, so only latents of layer 0 writing layer 1 can
    reconstruct that half of ``y_1``: a per-layer transcoder's FVU there stays
    near 0.5.
    """
    gen = torch.Generator().manual_seed(seed)
    dictionaries = [SparseDictionaryData(D_MODEL, N_FEATURES, 3.0, seed=seed + i) for i in (0, 1)]
    codes = [d.coefficients(n, seed=seed + 10 + i) for i, d in enumerate(dictionaries)]

    def writes() -> torch.Tensor:
        return torch.randn(N_FEATURES, D_MODEL, generator=gen) / D_MODEL**0.5

    outputs = [codes[0] @ writes(), codes[0] @ writes() + codes[1] @ writes()]
    acts = {}
    for layer in (0, 1):
        acts[f"blocks.{layer}.hook_resid_mid"] = codes[layer] @ dictionaries[layer].features
        acts[f"blocks.{layer}.hook_mlp_out"] = outputs[layer]
    return acts


def config(activation: str = "jumprelu", **kw: Any) -> CLTConfig:
    settings: dict[str, Any] = dict(
        n_layers=2, d_model=D_MODEL, d_sae=32, activation=activation, k=4, batch_size=256,
        total_tokens=256 * 200, lr=1e-2, log_every=10, checkpoint_every=4,
    )  # fmt: skip
    settings.update(kw)
    return CLTConfig(**settings)


def fvu(recon: torch.Tensor, y: torch.Tensor) -> float:
    return float((recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# measured (seed 0, 200 steps): FVU 0.21 (layer 1: 0.31) at L0 3.9 for jumprelu; 0.12 (0.16)
# at L0 7.8 for topk; 0.13 (0.17) at L0 7.7 for relu (L1 coefficient 1)
BOUNDS = {"jumprelu": 0.3, "topk": 0.2, "relu": 0.2}


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_loss_is_the_summed_error_plus_the_decoder_norm_weighted_penalty(activation: str) -> None:
    cfg = config(activation, n_layers=3, d_model=8, d_sae=6, k=2, sparsity_coefficient=0.7)
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    x, y = torch.randn(3, 5, 8, generator=gen) * 2, torch.randn(3, 5, 8, generator=gen)
    parts = clt_loss(clt, x, y, sparsity_scale=0.5)
    with torch.no_grad():
        recon, latents = clt(x)
        norms = [clt.W_dec[layer].pow(2).sum((1, 2)).sqrt() for layer in range(3)]
    error = sum(float((recon[m] - y[m]).pow(2).sum()) / 5 for m in range(3))
    if activation == "topk":
        penalty = 0.0
    else:
        counted = latents if activation == "relu" else (latents != 0).float()
        penalty = sum(float((counted[layer] @ norms[layer]).sum()) for layer in range(3)) / 5
    assert float(parts.sparsity) == pytest.approx(0.5 * 0.7 * penalty, rel=1e-5)
    assert float(parts.loss.detach()) == pytest.approx(error + 0.5 * 0.7 * penalty, rel=1e-5)
    torch.testing.assert_close(parts.reconstruction, recon.detach())


@pytest.mark.parametrize("activation", list(BOUNDS))
def test_loss_falls_and_cross_layer_structure_is_learnt(activation: str, one_thread: None) -> None:
    acts = cross_layer_data()
    cfg = config(activation, sparsity_coefficient=1.0 if activation == "relu" else -1.0)
    result = train_clt(cfg, TensorActivations(acts, cfg.batch_size), progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.6 * first["loss"]  # the penalty's warmup ends after the first record
    assert last["mse"] < 0.5 * first["mse"]
    assert last["fvu"] < BOUNDS[activation]
    assert last["layer_1/fvu"] < 0.45  # below what layer 1's own latents could reach (~0.5)
    # the returned CLT reads raw activations: the source's scales are folded in
    x = torch.stack([acts[f"blocks.{layer}.hook_resid_mid"][:1000] for layer in (0, 1)])
    y = torch.stack([acts[f"blocks.{layer}.hook_mlp_out"][:1000] for layer in (0, 1)])
    with torch.no_grad():
        recon, latents = result.clt(x)
    assert fvu(recon.transpose(0, 1).flatten(1), y.transpose(0, 1).flatten(1)) < BOUNDS[activation]
    assert float((latents != 0).sum(-1).float().mean(-1).sum()) == pytest.approx(
        last["l0"], rel=0.3
    )


@pytest.mark.parametrize("activation", list(BOUNDS))
def test_interrupted_then_resumed_equals_uninterrupted(
    tmp_path: Path, activation: str, one_thread: None
) -> None:
    cfg = config(activation, total_tokens=256 * 16, log_every=2)
    source = TensorActivations(cross_layer_data(1024), cfg.batch_size)
    whole = train_clt(cfg, source, checkpoint_dir=tmp_path / "a", progress=False)
    with pytest.raises(KilledError):
        train_clt(cfg, InterruptedSource(source, 10), checkpoint_dir=tmp_path / "b", progress=False)
    saved = json.loads((tmp_path / "b" / "latest" / "state.json").read_text())
    assert saved["meta"]["step"] == 8  # the last complete checkpoint before the kill
    resumed = train_clt(cfg, source, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    expected, got = whole.clt.state_dict(), resumed.clt.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert resumed.history == whole.history
    with pytest.raises(ConfigError, match="other configs"):
        train_clt(cfg.replace(lr=1e-3), source, checkpoint_dir=tmp_path / "b", resume=True,
                  progress=False)  # fmt: skip
    with pytest.raises(CheckpointExistsError):
        train_clt(cfg, source, checkpoint_dir=tmp_path / "b", progress=False)


def test_non_finite_activations_stop_the_run_and_keep_the_checkpoint(tmp_path: Path) -> None:
    cfg = config(total_tokens=256 * 16)
    source = TensorActivations(cross_layer_data(1024), cfg.batch_size)
    with pytest.raises(NonFiniteError, match=r"'blocks\.0\.hook_resid_mid' at step 6.*untouched"):
        train_clt(cfg, InterruptedSource(source, 6, poison=float("nan")),
                  checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "latest" / "state.json").read_text())
    assert saved["meta"]["step"] == 4
    train_clt(cfg, source, checkpoint_dir=tmp_path, resume=True, progress=False)  # still intact


def test_sources_lacking_a_hook_or_of_another_width_are_refused(tmp_path: Path) -> None:
    acts = cross_layer_data(512)
    cfg = config()
    partial = {k: v for k, v in acts.items() if k != "blocks.1.hook_mlp_out"}
    with pytest.raises(ConfigError, match=r"'blocks\.1\.hook_mlp_out'"):
        train_clt(cfg, TensorActivations(partial, cfg.batch_size), progress=False)
    with pytest.raises(ShapeMismatchError, match="d_model=8"):
        train_clt(config(d_model=8), TensorActivations(acts, cfg.batch_size), progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        train_clt(cfg, TensorActivations(acts, 128), progress=False)
    with pytest.raises(ConfigError, match=r"ln2\.hook_normalized"):
        train_clt(cfg.replace(input_hook="ln2.hook_normalized"),
                  TensorActivations(acts, cfg.batch_size), progress=False)  # fmt: skip


def test_trains_from_one_store_over_a_model_and_logs(
    tmp_path: Path, tiny: HookedTransformer
) -> None:
    n = tiny.cfg.n_layers
    names = ("hook_resid_mid", "hook_mlp_out")
    hooks = [f"blocks.{layer}.{name}" for layer in range(n) for name in names]
    tokens = torch.randint(
        0, tiny.cfg.d_vocab, (32, 16), generator=torch.Generator().manual_seed(0)
    )
    store = ActivationStore(tiny, hooks, tokens, batch_size=64, model_batch_size=16,
                            buffer_batches=4, exclude_bos=False)  # fmt: skip
    cfg = CLTConfig(n_layers=n, d_model=tiny.cfg.d_model, d_sae=16, batch_size=64,
                    total_tokens=64 * 8, log_every=4, lr=1e-2)  # fmt: skip
    result = train_clt(cfg, store, progress=False, log_csv=tmp_path / "log.csv")
    rows = list(csv.DictReader((tmp_path / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert {
        f"layer_{layer}/{m}" for layer in range(n) for m in ("fvu", "l0", "dead_fraction")
    } <= set(rows[0])
    assert [r["step"] for r in result.history] == [4, 8]
    # the CLT reads raw activations of the model
    _, cache = tiny.run_with_cache(tokens[:2], names_filter=lambda name: name in hooks)
    x = torch.stack([cache[f"blocks.{layer}.hook_resid_mid"] for layer in range(n)])
    with torch.no_grad():
        recon, _ = result.clt(x)
    assert recon.shape == x.shape and bool(torch.isfinite(recon).all())
