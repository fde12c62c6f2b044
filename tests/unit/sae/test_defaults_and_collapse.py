"""Issue 18's defaults: scaled learning rate and dead window, normalised inputs, collapse caught."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mitk.errors import ConfigError
from mitk.sae import SAEConfig, SparseDictionaryData, TensorActivations, train
from mitk.sae.collapse import CollapseError, CollapseWarning, collapse_verdict, warmup_steps
from mitk.sae.config import default_lr


def test_learning_rate_follows_the_square_root_rules() -> None:
    assert default_lr(2**14) == pytest.approx(2e-4)  # Gao et al.'s point, at 768 inputs
    assert default_lr(2**16) == pytest.approx(1e-4)
    assert default_lr(2**12) == pytest.approx(4e-4)
    assert default_lr(2**14, d_in=3072) == pytest.approx(1e-4)  # 4x wider, half the rate
    assert default_lr(2**14, d_in=192) == pytest.approx(4e-4)
    assert default_lr(4) == 1e-2  # capped for toy dictionaries
    cfg = SAEConfig(d_in=768, d_sae=2**14, architecture="topk")
    assert cfg.lr == -1.0 and cfg.peak_lr == pytest.approx(2e-4)
    assert cfg.replace(d_sae=2**16).peak_lr == pytest.approx(1e-4)  # replace rescales
    assert SAEConfig(d_in=3072, d_sae=2**14, architecture="topk").peak_lr == pytest.approx(1e-4)
    assert cfg.replace(architecture="relu").peak_lr == pytest.approx(4e-4)  # LR_SCALE
    assert cfg.replace(architecture="relu", d_sae=16).peak_lr == 1e-2  # the cap still holds
    assert cfg.replace(lr=5e-4).peak_lr == 5e-4
    assert SAEConfig.from_json(cfg.to_json()) == cfg


def test_dead_window_is_scaled_to_the_run_and_never_longer() -> None:
    short = SAEConfig(d_in=8, d_sae=32, batch_size=100, total_tokens=5_000)
    assert short.dead_window == 500
    tiny = SAEConfig(d_in=8, d_sae=32, batch_size=100, total_tokens=300)
    assert tiny.dead_window == 100  # at least one batch
    long = SAEConfig(d_in=8, d_sae=32, total_tokens=10**9)
    assert long.dead_window == 10_000_000  # Gao et al.'s window
    with pytest.raises(ConfigError, match="longer than the run"):
        SAEConfig(d_in=8, d_sae=32, batch_size=100, total_tokens=5_000, dead_after_tokens=6_000)
    with pytest.raises(ConfigError, match="dead_after_tokens must be positive"):
        SAEConfig(d_in=8, d_sae=32, dead_after_tokens=0)


def test_tensors_are_normalised_by_default_and_the_scale_is_folded_back() -> None:
    x = 0.01 * torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    source = TensorActivations(x, 64)
    scale = source.scale("activations")
    assert scale == pytest.approx(math.sqrt(8) / float(x.norm(dim=-1).mean()), rel=1e-6)
    batch = source.batch(0)["activations"]
    assert float(batch.norm(dim=-1).mean()) == pytest.approx(math.sqrt(8), rel=0.2)
    assert TensorActivations(x, 64, normalize=False).scale("activations") == 1.0


def _dictionary(seed: int = 0) -> tuple[SparseDictionaryData, torch.Tensor]:
    data = SparseDictionaryData(d_in=16, n_features=32, mean_active=2.0, seed=seed)
    return data, data.sample(8192)


def _relu(**kw: Any) -> SAEConfig:
    settings: dict[str, Any] = dict(d_in=16, d_sae=32, architecture="relu", batch_size=256,
                                    total_tokens=256 * 60, log_every=5)  # fmt: skip
    return SAEConfig(**{**settings, **kw})


def test_raw_small_activations_train_with_defaults() -> None:
    """The issue's case: rows of norm ~1 where the L1 default assumes sqrt(d_in)."""
    _, x = _dictionary()
    result = train(_relu(), x, progress=False)  # a warning here would fail the test
    last = result.history[-1]
    assert last["activations/l0"] > 0.5 and last["activations/fvu"] < 0.9
    assert last["activations/collapsed"] == 0.0


def test_collapse_warns_with_the_cause_and_can_stop_the_run() -> None:
    _, x = _dictionary()
    raw = TensorActivations(x, 256, normalize=False)  # L1 of 5 on norm-1 rows kills every latent
    with pytest.warns(
        CollapseWarning, match=r"(L0 fell to|FVU stayed at) .* lower l1_coefficient"
    ) as caught:
        result = train(_relu(), raw, progress=False)
    assert len(caught) == 1  # once per dictionary, not at every log step
    assert "does not normalise" in str(caught[0].message)
    flags = [r["activations/collapsed"] for r in result.history]
    assert flags[0] == 0.0 and flags[-1] == 1.0 and flags == sorted(flags)
    with pytest.raises(CollapseError, match="stop_on_collapse=True stopped the run"):
        train(_relu(stop_on_collapse=True), raw, progress=False)


def test_verdict_waits_for_warm_up_and_needs_fvu_to_stay_high() -> None:
    cfg = _relu(total_tokens=256 * 100)
    warm = warmup_steps(cfg)
    assert warm == 10  # the longer of the warm-ups (1, 5 steps) and a tenth of the run

    def record(step: int, l0: float, fvu: float) -> dict[str, Any]:
        return {"step": step, "x/l0": l0, "x/fvu": fvu}

    assert collapse_verdict(cfg, "x", [record(warm, 0.0, 1.0)], 2.0) is None
    assert "L0 fell" in (collapse_verdict(cfg, "x", [record(warm + 5, 0.0, 0.5)], 2.0) or "")
    once = [record(warm + 5, 3.0, 1.5)]
    assert collapse_verdict(cfg, "x", once, 2.0) is None  # one high FVU is not "stays"
    twice = [record(warm + 5, 3.0, 1.5), record(warm + 10, 3.0, 1.2)]
    assert "FVU stayed at 1.200" in (collapse_verdict(cfg, "x", twice, 2.0) or "")
    flagged = [{**twice[0], "x/collapsed": 1.0}, twice[1]]
    assert collapse_verdict(cfg, "x", flagged, 2.0) is None  # already reported


def test_several_dictionaries_on_one_hook_equal_training_each_alone() -> None:
    _, x = _dictionary(seed=1)
    base: dict[str, Any] = dict(d_in=16, architecture="topk", batch_size=256,
                                total_tokens=256 * 12, log_every=4)  # fmt: skip
    cfgs = [SAEConfig(d_sae=32, k=2, **base), SAEConfig(d_sae=32, k=4, **base),
            SAEConfig(d_sae=64, k=2, **base)]  # fmt: skip
    together = train(cfgs, x, progress=False)
    assert list(together.saes) == ["activations[0]", "activations[1]", "activations[2]"]
    assert {"activations[1]/l0", "activations[2]/fvu"} <= set(together.history[-1])
    for cfg, sae in zip(cfgs, together.in_order, strict=True):
        alone = train(cfg, x, progress=False).sae
        for name, tensor in alone.state_dict().items():
            assert torch.equal(tensor, sae.state_dict()[name]), (cfg.k, cfg.d_sae, name)


def test_l0_weight_scales_with_the_input_width() -> None:
    assert SAEConfig(d_in=32, d_sae=64, architecture="jumprelu").l0_weight == 2.0
    assert SAEConfig(d_in=2048, d_sae=64, architecture="jumprelu").l0_weight == 128.0
    explicit = SAEConfig(d_in=32, d_sae=64, architecture="jumprelu", l0_coefficient=0.5)
    assert explicit.l0_weight == 0.5
    with pytest.raises(ConfigError, match="l0_coefficient must be finite and >= 0"):
        SAEConfig(d_in=32, d_sae=64, l0_coefficient=-2.0)


def test_l1_weight_is_per_architecture_unless_given() -> None:
    assert SAEConfig(d_in=32, d_sae=64, architecture="relu").l1_weight == 5.0
    assert SAEConfig(d_in=32, d_sae=64, architecture="gated").l1_weight == 4.0
    explicit = SAEConfig(d_in=32, d_sae=64, architecture="gated", l1_coefficient=0.5)
    assert explicit.l1_weight == 0.5
    with pytest.raises(ConfigError, match="l1_coefficient must be finite and >= 0"):
        SAEConfig(d_in=32, d_sae=64, l1_coefficient=-2.0)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("lr", "fast", "lr must be"), ("k", 2.5, "k must be"), ("stop_on_collapse", 1, "stop_on"),
     ("matryoshka_widths", ["a"], "matryoshka_widths must be"), ("hook_name", 3, "hook_name")],
)  # fmt: skip
def test_wrong_field_types_name_the_field(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 16, field: value})
