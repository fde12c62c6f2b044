"""Resampling silent latents: what a resampled latent becomes, and what it buys on ground truth."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mitk.errors import ConfigError
from mitk.sae import SAEConfig, SparseAutoencoder, SparseDictionaryData, TensorActivations, train
from mitk.sae import mean_max_cosine_similarity as mmcs
from mitk.sae.resample import resample_, resample_due, resample_silent_
from tests.interrupted import kill_then_resume


def _sae(arch: str = "jumprelu", **kw: Any) -> SparseAutoencoder:
    settings: dict[str, Any] = dict(d_in=8, d_sae=12, architecture=arch, batch_size=32,
                                    total_tokens=32 * 100)  # fmt: skip
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(**{**settings, **kw}))
    with torch.no_grad():  # trained-looking weights, so a reset is visible
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return sae


def _adam_with_moments(sae: SparseAutoencoder, x: torch.Tensor) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(x).reconstruction.pow(2).sum().backward()
    optimizer.step()
    return optimizer


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated"])
def test_a_resampled_latent_is_a_fresh_one_pointing_at_a_badly_reconstructed_row(
    arch: str,
) -> None:
    sae = _sae(arch)
    x = torch.randn(32, 8)
    optimizer = _adam_with_moments(sae, x)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with torch.no_grad():
        residual = x - sae(x).reconstruction
    latents = torch.tensor([2, 7, 11])
    assert resample_(sae, latents, x, x, optimizer, seed=1)

    cfg, rest = sae.cfg, torch.tensor([i for i in range(12) if i not in (2, 7, 11)])
    residual_directions = _unit(residual)
    for j in latents.tolist():
        row = sae.W_dec[j].detach()
        assert row.norm() == pytest.approx(cfg.decoder_init_norm, rel=1e-5)
        # parallel to the residual of one row of the batch
        assert float((residual_directions @ _unit(row)).max()) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(sae.W_enc[:, j].detach(), row)  # an SAE's W_enc = W_dec^T
    vectors = ("b_gate", "b_mag", "r_mag") if arch == "gated" else ("b_enc",)
    for name in vectors:
        assert torch.all(getattr(sae, name)[latents] == 0), name
    if arch == "jumprelu":
        assert torch.allclose(sae.threshold[latents], torch.tensor(cfg.jumprelu_init_threshold))
    for parameter, where in ((sae.W_dec, (latents,)), (sae.W_enc, (slice(None), latents))):
        moments = optimizer.state[parameter]
        assert torch.all(moments["exp_avg"][where] == 0)
        assert torch.all(moments["exp_avg_sq"][where] == 0)
    # every other latent, and b_dec, are untouched to the bit
    after = sae.state_dict()
    assert torch.equal(after["W_dec"][rest], before["W_dec"][rest])
    assert torch.equal(after["W_enc"][:, rest], before["W_enc"][:, rest])
    for name in vectors:
        assert torch.equal(after[name][rest], before[name][rest]), name
    assert torch.equal(after["b_dec"], before["b_dec"])
    assert optimizer.state[sae.W_dec]["exp_avg"][rest].abs().sum() > 0


def test_rows_are_drawn_by_their_error_so_a_perfect_row_is_never_picked() -> None:
    sae = _sae()
    x = torch.randn(32, 8)
    with torch.no_grad():
        y = sae(x).reconstruction.clone()
    y[5] += torch.arange(8.0)  # the only row with any error
    resample_(sae, torch.arange(12), x, y, torch.optim.Adam(sae.parameters()), seed=0)
    expected = _unit(torch.arange(8.0))
    torch.testing.assert_close(_unit(sae.W_dec.detach()), expected.expand(12, 8))
    # nothing to point at: nothing changes
    with torch.no_grad():
        y = sae(x).reconstruction.clone()
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    assert not resample_(sae, torch.arange(12), x, y, torch.optim.Adam(sae.parameters()), seed=0)
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in state.items())


def test_a_transcoders_encoder_reads_the_picked_rows_centred_input() -> None:
    sae = _sae(d_out=6, hook_name="a", target_hook_name="b")
    x, y = torch.randn(32, 8), torch.randn(32, 6)
    resample_(sae, torch.tensor([0, 3]), x, y, torch.optim.Adam(sae.parameters()), seed=2)
    inputs = _unit(x - x.mean(0))
    for j in (0, 3):
        column = _unit(sae.W_enc[:, j].detach())
        assert float((inputs @ column).max()) == pytest.approx(1.0, abs=1e-5)
        assert sae.W_dec[j].shape == (6,)


def test_only_latents_idle_for_the_window_are_resampled_and_their_clocks_restart() -> None:
    sae = _sae(resample_after_tokens=32 * 3)  # three steps of 32 rows
    idle = torch.tensor([0, 1, 2, 3, 4, 2, 9, 0, 0, 3, 0, 0])
    x = torch.randn(32, 8)
    decoder = sae.W_dec.detach().clone()
    count = resample_silent_(sae, idle, x, x, torch.optim.Adam(sae.parameters()), seed=0)
    assert count == 4
    changed = (sae.W_dec.detach() != decoder).any(-1).nonzero().squeeze(1).tolist()
    assert changed == [3, 4, 6, 9]
    assert idle.tolist() == [0, 1, 2, 0, 0, 2, 0, 0, 0, 0, 0, 0]


def test_the_schedule_and_its_defaults() -> None:
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", batch_size=10, total_tokens=2000)
    assert cfg.resample_interval == 10 and cfg.resample_window == 20  # 5% and 1% of the run
    due = [done for done in range(1, cfg.total_steps + 1) if resample_due(cfg, done)]
    assert due == list(range(10, 141, 10))  # never after 70% of the 200 steps
    for arch in ("relu", "gated"):
        assert SAEConfig(d_in=8, d_sae=16, architecture=arch).resample_interval > 0
    for arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        assert SAEConfig(d_in=8, d_sae=16, architecture=arch, k=2).resample_interval == 0
    off = SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", resample_every=0)
    assert off.resample_interval == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"architecture": "topk", "k": 2, "resample_every": 0.1}, "not 'topk'.*AuxK"),
     ({"resample_every": 1.5}, "resample_every must lie in"),
     ({"resample_every": math.nan}, "resample_every must (lie in|be a finite)"),
     ({"resample_until": -0.1}, "resample_until must lie in"),
     ({"resample_after_tokens": 0}, "resample_after_tokens must be positive")],
)  # fmt: skip
def test_bad_resampling_settings_are_refused_by_name(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SAEConfig(**{"d_in": 8, "d_sae": 16, "architecture": "jumprelu", **settings})


@pytest.mark.parametrize(
    "settings",
    [{"architecture": "jumprelu", "jumprelu_init_threshold": 3.0},
     {"architecture": "relu", "l1_coefficient": 30.0}],
    ids=["jumprelu", "relu"],
)  # fmt: skip
def test_a_run_that_resamples_resumes_bit_identically(
    settings: dict, tmp_path: Path, one_thread: None
) -> None:
    """Killed at step 10, resumed from step 8: the same latents are resampled the same way."""
    shape = {"d_in": 16, "d_sae": 48, "batch_size": 64, "total_tokens": 64 * 24, "lr": 3e-3}
    cfg = SAEConfig(**shape, log_every=4, checkpoint_every=4, collapse_fvu_ceiling=10.0, **settings)
    source = TensorActivations(SparseDictionaryData(16, 48, 3.0).sample(2000), 64, seed=5)
    whole, _ = kill_then_resume(cfg, source, tmp_path)
    resampled = [row["activations/resampled"] for row in whole.history]
    assert resampled[-1] > resampled[2]  # some after the resumed step 8 ...
    if cfg.architecture == "jumprelu":  # ... and, here, some before it
        assert resampled[1] > 0


def test_resampling_finds_features_a_long_jumprelu_run_loses(one_thread: None) -> None:
    """Ground truth (192 features in 48 dimensions): silent latents are revived onto them."""
    data = SparseDictionaryData(48, 192, 4.0, seed=3)
    x, held_out = data.sample(200_000, seed=4), data.sample(4096, seed=9)
    runs = {}
    for every in (0.0, -1.0):
        cfg = SAEConfig(d_in=48, d_sae=192, architecture="jumprelu", batch_size=512,
                        total_tokens=600_000, resample_every=every)  # fmt: skip
        result = train(cfg, x, progress=False)
        with torch.no_grad():
            silent = int(((result.sae(held_out).latents > 0).float().mean(0) < 1e-3).sum())
        found = mmcs(result.sae.W_dec.detach(), data.features)
        runs[every] = (found, silent, result.history[-1]["activations/resampled"])
    (found_off, silent_off, none), (found_on, silent_on, resampled) = runs[0.0], runs[-1.0]
    assert none == 0 and resampled > 0
    # measured: 0.916 -> 0.975, 41 -> 14 silent latents
    assert found_on > found_off + 0.03 and found_on > 0.95
    assert silent_on < silent_off / 2
