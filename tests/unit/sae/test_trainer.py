"""The SAE trainer: resume is bit-identical, bad numbers stop it cleanly, logs are complete."""

from __future__ import annotations

import csv
from pathlib import Path
import sys
from typing import Any

import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae import (
    ActivationStore,
    NonFiniteError,
    SAEConfig,
    SparseDictionaryData,
    TensorActivations,
    train,
)
import mitk.sae.losses as losses
from tests.interrupted import InterruptedSource, KilledError, kill_then_resume


def config(arch: str = "topk", **kw: Any) -> SAEConfig:
    settings: dict[str, Any] = dict(
        d_in=16, d_sae=48, architecture=arch, k=3, batch_size=64, total_tokens=64 * 24,
        lr=3e-3, log_every=4, checkpoint_every=4, dead_after_tokens=64,
        l1_coefficient=0.1, l0_coefficient=0.05, jumprelu_init_threshold=0.05,
        jumprelu_bandwidth=0.05,
        collapse_fvu_ceiling=10.0,  # Gaussian noise: 24 steps reconstruct next to nothing
    )  # fmt: skip
    settings.update(kw)
    return SAEConfig(**settings)


def data(n: int = 2000) -> torch.Tensor:
    return SparseDictionaryData(d_in=16, n_features=48, mean_active=3.0).sample(n)


@pytest.mark.parametrize(
    ("arch", "density"),
    [("relu", 0.0), ("relu", 1.0), ("jumprelu", 0.0), ("jumprelu", 1.0), ("topk", None),
     ("batchtopk", None)],
    ids=["relu-dense", "relu-gathered", "jumprelu-dense", "jumprelu-gathered", "topk", "batchtopk"],
)  # fmt: skip
def test_interrupted_then_resumed_equals_uninterrupted(
    arch: str, density: float | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if density is not None:  # both loss paths must resume bit-identically
        monkeypatch.setattr(losses, "SPARSE_DENSITY", density)
    cfg = config(arch)
    source = TensorActivations(data(), cfg.batch_size, seed=5)
    whole, _ = kill_then_resume(cfg, source, tmp_path)
    if arch in ("topk", "batchtopk"):  # the AuxK path (dead latents) was exercised too
        assert any(row[f"{cfg.hook_name or 'activations'}/aux_loss"] > 0 for row in whole.history)


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    cfg = config()
    source = TensorActivations(data(), cfg.batch_size)
    train(cfg, source, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="other configs or another activation source"):
        train(cfg.replace(lr=1e-2), source, checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_bad_numbers_stop_training_and_keep_the_checkpoint(poison: float, tmp_path: Path) -> None:
    cfg = config()
    source = TensorActivations(data(), cfg.batch_size)
    with pytest.raises(KilledError):
        train(cfg, InterruptedSource(source, 9), checkpoint_dir=tmp_path / "ref", progress=False)
    with pytest.raises(NonFiniteError, match=r"at step 9 hold .* NaN/inf"):
        train(
            cfg,
            InterruptedSource(source, 9, poison),
            checkpoint_dir=tmp_path / "run",
            progress=False,
        )
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        good = (tmp_path / "ref" / "latest" / name).read_bytes()
        assert (tmp_path / "run" / "latest" / name).read_bytes() == good, name


def test_metrics_are_logged_to_csv_and_describe_training(tmp_path: Path) -> None:
    cfg = config(total_tokens=64 * 40, log_every=10, checkpoint_every=10)
    result = train(cfg, data(), log_csv=tmp_path / "log.csv", progress=False)
    with (tmp_path / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert [float(r["activations/fvu"]) for r in rows] == [
        row["activations/fvu"] for row in result.history
    ]
    first, last = result.history[0], result.history[-1]
    assert last["activations/fvu"] < first["activations/fvu"]
    assert last["activations/l0"] == pytest.approx(3.0, abs=0.5)
    assert last["activations/lr"] < cfg.lr  # decayed over the final 20%
    for key in ("loss", "mse", "aux_loss", "dead_fraction", "dense_fraction"):
        assert f"activations/{key}" in last


def test_training_on_normalised_activations_returns_an_sae_for_raw_ones() -> None:
    x = data() * 7.0
    cfg = config()
    normalised = TensorActivations(x, cfg.batch_size, normalize=True)
    scale = normalised.scale("activations")
    assert scale != pytest.approx(1.0)
    folded = train(cfg, normalised, progress=False).sae
    by_hand = train(cfg, TensorActivations(x * scale, cfg.batch_size), progress=False).sae
    probe = x[:50]
    torch.testing.assert_close(folded.encode(probe), by_hand.encode(probe * scale))
    torch.testing.assert_close(
        folded(probe).reconstruction, by_hand(probe * scale).reconstruction / scale
    )


def test_several_hooks_train_together_from_one_model_pass(gpt2: HookedTransformer) -> None:
    names = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    tokens = torch.randint(1, gpt2.cfg.d_vocab, (64, 9), generator=torch.Generator().manual_seed(0))
    store = ActivationStore(gpt2, names, tokens, batch_size=64, model_batch_size=16,
                            buffer_batches=4, exclude_bos=False)  # fmt: skip
    cfgs = [
        SAEConfig(
            d_in=store.d_in[n],
            d_sae=64,
            k=4,
            hook_name=n,
            batch_size=64,
            total_tokens=64 * 8,
            log_every=4,
            checkpoint_every=4,
        )
        for n in names
    ]
    result = train(cfgs, store, progress=False)
    assert list(result.saes) == names
    assert result.saes[names[1]].cfg.d_in == gpt2.cfg.d_mlp
    assert f"{names[1]}/fvu" in result.history[-1]
    with pytest.raises(ValueError, match="2 SAEs were trained"):
        _ = result.sae


def test_mismatched_configs_are_refused() -> None:
    x = data()
    source = TensorActivations({"a": x, "b": x}, 64)
    with pytest.raises(ConfigError, match="set hook_name"):
        train(config(), source, progress=False)
    with pytest.raises(ConfigError, match="not read by the source"):
        train(config(hook_name="c"), source, progress=False)
    with pytest.raises(ShapeMismatchError, match="d_in=8, the activations of 'a' have width 16"):
        train(config(hook_name="a", d_in=8), source, progress=False)
    with pytest.raises(ConfigError, match="batch_size=32 differs"):
        train(config(hook_name="a", batch_size=32), source, progress=False)
    with pytest.raises(ConfigError, match="hook 'c' is not read by the source"):
        train(config(hook_name="a", target_hook_name="c"), source, progress=False)
    with pytest.raises(ShapeMismatchError, match="d_out=8, the activations of 'b' have width 16"):
        train(config(hook_name="a", target_hook_name="b", d_out=8), source, progress=False)
    with pytest.raises(ConfigError, match="must share batch_size, total_tokens"):
        train([config(hook_name="a"), config(hook_name="b", total_tokens=64 * 30)], source,
              progress=False)  # fmt: skip


def test_metrics_go_to_weights_and_biases_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[tuple[dict[str, Any], int]] = []
    finished: list[bool] = []

    class Run:
        def log(self, row: dict[str, Any], step: int) -> None:
            logged.append((row, step))

        def finish(self) -> None:
            finished.append(True)

    class FakeWandb:  # stands in for the wandb package, which the tests do not install
        @staticmethod
        def init(project: str, config: dict[str, Any]) -> Run:
            assert project == "sae-runs" and config["saes"][0]["architecture"] == "topk"
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    result = train(config(), data(), wandb_project="sae-runs", progress=False)
    assert [step for _, step in logged] == [row["step"] for row in result.history]
    assert logged[-1][0] == result.history[-1] and finished == [True]


def test_asking_for_weights_and_biases_without_it_installed_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(config(), data(), wandb_project="sae-runs", progress=False)
