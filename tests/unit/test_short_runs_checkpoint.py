"""Short runs checkpoint by the clock and at the end, so any run resumes; resuming nothing says so.

The clock is injected: each batch "takes" ten seconds, so which steps checkpoint is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
import sys
from typing import Any

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.checkpoint import CheckpointSchedule, NoCheckpointError
from mitk.cli.app import main
from mitk.errors import ConfigError
from mitk.sae import SAEConfig, SparseAutoencoder, SparseDictionaryData, TensorActivations, train
from mitk.train import TrainConfig, train_language_model
from tests.interrupted import InterruptedSource, KilledError

SECONDS_PER_BATCH = 10.0


class Clock:
    """A fake ``time.monotonic`` that only moves when a batch is drawn."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slow(source: Any, clock: Clock, kill_at: int | None = None) -> InterruptedSource:
    """``source`` with every batch advancing ``clock``; killed at ``kill_at``."""

    def tick() -> None:
        clock.now += SECONDS_PER_BATCH

    return InterruptedSource(source, kill_at, on_batch=tick)


def sae_config(**kw: Any) -> SAEConfig:
    # checkpoint_every stays at its default, far beyond these 24 steps
    settings: dict[str, Any] = dict(
        d_in=16, d_sae=48, architecture="topk", k=3, batch_size=64, total_tokens=64 * 24,
        lr=3e-3, log_every=4, dead_after_tokens=64, checkpoint_seconds=35.0,
    )  # fmt: skip
    settings.update(kw)
    return SAEConfig(**settings)


def sae_source() -> TensorActivations:
    data = SparseDictionaryData(d_in=16, n_features=48, mean_active=3.0).sample(2000)
    return TensorActivations(data, 64, seed=5)


def saved_step(directory: Path) -> int:
    return int(json.loads((directory / "latest" / "state.json").read_text())["meta"]["step"])


def test_the_schedule_checks_the_clock_only_at_log_steps() -> None:
    clock = Clock()
    schedule = CheckpointSchedule(every_steps=1000, every_seconds=35, total_steps=24, clock=clock)
    clock.now = 40
    assert not schedule.due(3, log_step=False)  # late, but metrics are half-accumulated
    assert schedule.due(4, log_step=True)
    schedule.written()
    assert not schedule.due(8, log_step=True)  # the clock restarted
    assert schedule.due(24, log_step=True)  # the end always checkpoints
    assert not CheckpointSchedule(1000, 0, 24, clock).by_time()  # 0 turns the clock off


@pytest.mark.parametrize(("kill_at", "expected"), [(10, 8), (17, 16)])
def test_a_short_sae_run_killed_midway_resumes_to_the_uninterrupted_result(
    kill_at: int, expected: int, tmp_path: Path
) -> None:
    cfg = sae_config()
    assert cfg.total_steps < cfg.checkpoint_every
    whole = train(cfg, sae_source(), progress=False)
    clock = Clock()
    with pytest.raises(KilledError):
        train(cfg, slow(sae_source(), clock, kill_at), checkpoint_dir=tmp_path,
              progress=False, clock=clock)  # fmt: skip
    # 10 s a batch, 35 s between checkpoints, at log steps (every 4): steps 4, 8, 12, 16
    assert saved_step(tmp_path) == expected
    clock = Clock()
    resumed = train(cfg, slow(sae_source(), clock), checkpoint_dir=tmp_path, resume=True,
                    progress=False, clock=clock)  # fmt: skip
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    assert resumed.history == whole.history
    assert saved_step(tmp_path) == cfg.total_steps  # and it ends with a checkpoint


def test_a_resume_may_change_when_checkpoints_are_written(tmp_path: Path) -> None:
    cfg = sae_config(total_tokens=64 * 8)
    whole = train(cfg, sae_source(), progress=False)
    with pytest.raises(KilledError):
        train(cfg.replace(checkpoint_every=4), slow(sae_source(), Clock(), 6),
              checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    resumed = train(cfg.replace(checkpoint_seconds=0), sae_source(), checkpoint_dir=tmp_path,
                    resume=True, progress=False)  # fmt: skip
    assert torch.equal(whole.sae.W_dec, resumed.sae.W_dec)


def test_resuming_a_run_that_never_checkpointed_says_so(tmp_path: Path) -> None:
    cfg = sae_config()
    with pytest.raises(KilledError):  # killed before its first checkpoint: the clock stood still
        train(cfg, slow(sae_source(), Clock(), 3), checkpoint_dir=tmp_path, progress=False,
              clock=Clock())  # fmt: skip
    with pytest.raises(NoCheckpointError, match=r"nothing to resume: .* no complete checkpoint"):
        train(cfg, sae_source(), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="needs the checkpoint_dir"):
        train(cfg, sae_source(), resume=True, progress=False)


LM = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=13, n_ctx=8)


def lm_batches(step: int) -> torch.Tensor:
    return torch.randint(0, LM.d_vocab, (4, 8), generator=torch.Generator().manual_seed(step))


def test_a_short_language_model_run_killed_midway_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    cfg = TrainConfig(steps=12, lr=1e-2, warmup=3, log_every=2, checkpoint_seconds=25)
    assert cfg.steps < cfg.checkpoint_every
    straight = HookedTransformer(LM, seed=0)
    expected = train_language_model(straight, lm_batches, cfg, progress=False)
    clock = Clock()

    def slow_batches_killed_at_9(step: int) -> torch.Tensor:
        if step == 9:
            raise KilledError
        clock.now += SECONDS_PER_BATCH
        return lm_batches(step)

    with pytest.raises(KilledError):
        train_language_model(HookedTransformer(LM, seed=0), slow_batches_killed_at_9, cfg,
                             tmp_path, progress=False, clock=clock)  # fmt: skip
    assert saved_step(tmp_path) == 8  # 25 s at 10 s a batch: the log steps 4 and 8
    resumed = HookedTransformer(LM, seed=7)
    history = train_language_model(resumed, lm_batches, cfg, tmp_path, resume=True,
                                   progress=False)  # fmt: skip
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert history == expected


def test_resuming_a_language_model_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, warmup=1)
    model = HookedTransformer(LM, seed=0)
    with pytest.raises(NoCheckpointError, match=str(tmp_path)):
        train_language_model(model, lm_batches, cfg, tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="needs the checkpoint_dir"):
        train_language_model(model, lm_batches, cfg, resume=True, progress=False)


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``mitk ARGS`` in this process, through the console entry's exit-code mapping."""
    monkeypatch.setattr(sys, "argv", ["mitk", *args])
    try:
        main()
    except SystemExit as done:
        return int(done.code or 0)
    return 0


# six steps on toy activations reconstruct nothing yet, which the trainer rightly warns about
@pytest.mark.filterwarnings("ignore::mitk.sae.collapse.CollapseWarning")
def test_cli_short_sae_run_checkpoints_and_resume_without_one_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sae_train = ["sae", "train", "--model", "toy-induction", "--hook", "blocks.0.hook_resid_post",
                 "--induction", "4", "--n-sequences", "16", "--batch-size", "32",
                 "--total-tokens", "192", "--log-every", "2", "--quiet"]  # fmt: skip
    empty = tmp_path / "empty"
    code = run_cli(monkeypatch, *sae_train, "--out", str(tmp_path / "never"),
                   "--checkpoint-dir", str(empty), "--resume")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: nothing to resume: ") and str(empty) in err
    assert "Traceback" not in err and not (tmp_path / "never").exists()

    ckpt = tmp_path / "ckpt"
    assert run_cli(monkeypatch, *sae_train, "--out", str(tmp_path / "a"),
                   "--checkpoint-dir", str(ckpt)) == 0  # fmt: skip
    assert saved_step(ckpt) == 6  # 192 / 32 steps, far fewer than checkpoint_every
    assert run_cli(monkeypatch, *sae_train, "--out", str(tmp_path / "b"),
                   "--checkpoint-dir", str(ckpt), "--resume") == 0  # fmt: skip
    first, again = (SparseAutoencoder.load(tmp_path / name) for name in ("a", "b"))
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
