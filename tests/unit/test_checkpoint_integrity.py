"""Checkpoints are verified, not trusted: each damaged file is named and the previous one used.

Every file of a checkpoint (both safetensors files, state.json and the
hashes.json ledger) is damaged in each way of ``tests.corruption``; resuming
must warn naming it and end exactly where an uninterrupted run ends, or, when
no checkpoint is intact, stop with ``NoIntactCheckpointError`` and touch
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
import json
from pathlib import Path
import shutil
import sys
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch import nn

from mitk import HookedTransformer, TransformerConfig
from mitk.checkpoint import (
    FILES,
    LATEST,
    LEDGER,
    PREVIOUS,
    CheckpointExistsError,
    NoCheckpointError,
    NoIntactCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from mitk.cli.app import main
from mitk.integrity import IntegrityWarning
from mitk.sae import SAEConfig, SparseDictionaryData, TensorActivations, TrainResult, train
from mitk.train import TrainConfig, train_language_model
from tests.corruption import CORRUPTIONS, LEDGER_SYMPTOMS, SYMPTOMS
from tests.interrupted import InterruptedSource, KilledError

KINDS = [*FILES, LEDGER]


SAE_CFG = SAEConfig(
    d_in=16, d_sae=32, architecture="topk", k=3, batch_size=32, total_tokens=32 * 12, lr=3e-3,
    log_every=2, checkpoint_every=4, checkpoint_seconds=0, dead_after_tokens=64,
)  # fmt: skip


def sae_source() -> TensorActivations:
    data = SparseDictionaryData(d_in=16, n_features=32, mean_active=3.0).sample(600)
    return TensorActivations(data, 32, seed=5)


def step_of(folder: Path) -> int:
    return int(json.loads((folder / "state.json").read_text())["meta"]["step"])


@pytest.fixture(scope="module")
def uninterrupted() -> TrainResult:
    return train(SAE_CFG, sae_source(), progress=False)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints of a run killed at step 10: latest/ at step 8, previous/ at step 4."""
    directory = tmp_path_factory.mktemp("killed")
    with pytest.raises(KilledError):
        train(
            SAE_CFG, InterruptedSource(sae_source(), 10), checkpoint_dir=directory, progress=False
        )
    assert (step_of(directory / LATEST), step_of(directory / PREVIOUS)) == (8, 4)
    return directory


@pytest.fixture
def checkpoints(killed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(killed, tmp_path / "ckpt"))


def assert_same_result(a: TrainResult, b: TrainResult) -> None:
    for name, tensor in a.sae.state_dict().items():
        assert torch.equal(tensor, b.sae.state_dict()[name]), name
    assert a.history == b.history


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_an_intact_resume_is_silent_and_rotates(
    checkpoints: Path, uninterrupted: TrainResult
) -> None:
    # warnings are errors in the tests: an intact checkpoint must raise none
    resumed = train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, resume=True,
                    progress=False)  # fmt: skip
    assert_same_result(resumed, uninterrupted)
    assert (step_of(checkpoints / LATEST), step_of(checkpoints / PREVIOUS)) == (12, 8)
    assert sorted(p.name for p in checkpoints.iterdir()) == [LATEST, PREVIOUS]
    assert sorted(p.name for p in (checkpoints / LATEST).iterdir()) == sorted(KINDS)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_latest_falls_back_to_previous_with_a_warning_naming_it(
    kind: str, corruption: str, checkpoints: Path, uninterrupted: TrainResult
) -> None:
    CORRUPTIONS[corruption](checkpoints / LATEST / kind)
    symptom = (LEDGER_SYMPTOMS if kind == LEDGER else SYMPTOMS)[corruption]
    with pytest.warns(IntegrityWarning) as caught:
        resumed = train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, resume=True,
                        progress=False)  # fmt: skip
    first = str(caught[0].message)
    assert f"{LATEST}/{kind}: {symptom}" in first, first
    assert f"resuming from {checkpoints / PREVIOUS} instead" in first
    assert_same_result(resumed, uninterrupted)  # steps 5..12 were redone, to the same end
    # the damaged folder was dropped at the first save, never kept as "previous"
    assert (step_of(checkpoints / LATEST), step_of(checkpoints / PREVIOUS)) == (12, 8)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_with_no_intact_checkpoint_resume_stops_and_touches_nothing(
    kind: str, corruption: str, checkpoints: Path
) -> None:
    CORRUPTIONS[corruption](checkpoints / LATEST / kind)
    other = "flip" if corruption != "flip" else "truncate"
    CORRUPTIONS[other](checkpoints / PREVIOUS / "model.safetensors")
    before = snapshot(checkpoints)
    with pytest.raises(NoIntactCheckpointError) as raised:
        train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, resume=True, progress=False)
    message = str(raised.value)
    assert f"{LATEST}/{kind}" in message and f"{PREVIOUS}/model.safetensors" in message
    assert message.startswith(f"no intact checkpoint to resume in {checkpoints}")
    assert isinstance(raised.value, NoCheckpointError)
    assert snapshot(checkpoints) == before


def test_a_damaged_previous_is_ignored_while_latest_is_intact(
    checkpoints: Path, uninterrupted: TrainResult
) -> None:
    CORRUPTIONS["flip"](checkpoints / PREVIOUS / "optimizer.safetensors")
    resumed = train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, resume=True,
                    progress=False)  # fmt: skip
    assert_same_result(resumed, uninterrupted)
    assert step_of(checkpoints / PREVIOUS) == 8  # the damaged one was replaced


def test_a_missing_latest_folder_falls_back_with_a_warning(
    checkpoints: Path, uninterrupted: TrainResult
) -> None:
    shutil.rmtree(checkpoints / LATEST)
    with pytest.warns(IntegrityWarning, match=rf"{LATEST}: missing; resuming from .*{PREVIOUS}"):
        resumed = train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, resume=True,
                        progress=False)  # fmt: skip
    assert_same_result(resumed, uninterrupted)


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(checkpoints: Path) -> None:
    leftovers = [
        checkpoints / ".latest.tmp-abcd1234",  # a staging folder the kill left
        checkpoints / ".previous.tmp-0123abcd",  # a discarded folder half deleted
        checkpoints / ".latest.old",  # the set-aside copy, stale once latest/ is back
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (checkpoints / ".latest.a1b2c3d4.tmp").write_bytes(b"half")
    kept = [checkpoints / "notes.txt", checkpoints / ".latest.tmp-mine", checkpoints / ".other.old"]
    for path in kept:
        path.write_text("not ours")
    train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, resume=True, progress=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        [LATEST, PREVIOUS, *(p.name for p in kept)]
    )


LM = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=13, n_ctx=8)
LM_CFG = TrainConfig(steps=8, lr=1e-2, warmup=2, log_every=2, checkpoint_every=2,
                     checkpoint_seconds=0)  # fmt: skip


def lm_batches(step: int) -> torch.Tensor:
    return torch.randint(0, LM.d_vocab, (4, 8), generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("kind", KINDS)
def test_the_language_model_loop_falls_back_too(kind: str, tmp_path: Path) -> None:
    straight = HookedTransformer(LM, seed=0)
    expected = train_language_model(straight, lm_batches, LM_CFG, progress=False)

    def killed_at_7(step: int) -> torch.Tensor:
        if step == 7:
            raise KilledError
        return lm_batches(step)

    with pytest.raises(KilledError):
        train_language_model(HookedTransformer(LM, seed=0), killed_at_7, LM_CFG, tmp_path,
                             progress=False)  # fmt: skip
    CORRUPTIONS["flip"](tmp_path / LATEST / kind)
    resumed = HookedTransformer(LM, seed=7)
    with pytest.warns(IntegrityWarning, match=f"{LATEST}/{kind}"):
        history = train_language_model(resumed, lm_batches, LM_CFG, tmp_path, resume=True,
                                       progress=False)  # fmt: skip
    assert history == expected
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def tiny_state(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = nn.Linear(6, 5)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(3, 6)).square().sum().backward()
    optimizer.step()
    return module, optimizer


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """previous/ holds seed 1's module (step 1), latest/ seed 2's (step 2)."""
    directory = tmp_path_factory.mktemp("two")
    for step in (1, 2):
        save_checkpoint(directory, *tiny_state(step), {"step": step})
    yield directory


@settings(max_examples=150, deadline=None)
@given(
    folder=st.sampled_from([LATEST, PREVIOUS]),
    kind=st.sampled_from(KINDS),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    damage=st.one_of(
        st.tuples(st.just("xor"), st.integers(min_value=1, max_value=255)),
        st.tuples(st.just("cut"), st.floats(min_value=0, max_value=1, exclude_max=True)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=8)),
    ),
)
def test_any_damage_to_any_file_is_never_resumed_from_silently(
    two_checkpoints: Path, folder: str, kind: str, where: float, damage: tuple[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(shutil.copytree(two_checkpoints, Path(scratch) / "ckpt"))
        path = directory / folder / kind
        data = bytearray(path.read_bytes())
        how, arg = damage
        if how == "xor":
            data[int(where * len(data))] ^= arg
        elif how == "cut":
            data = data[: int(arg * len(data))]
        else:
            data += arg
        path.write_bytes(bytes(data))
        module, optimizer = tiny_state(0)
        if folder == LATEST:
            with pytest.warns(IntegrityWarning, match=f"{LATEST}/{kind}"):
                meta = load_checkpoint(directory, module, optimizer)
            expected_module, _ = tiny_state(1)
            assert meta == {"step": 1}
        else:  # the newest is intact: used without a word
            meta = load_checkpoint(directory, module, optimizer)
            expected_module, _ = tiny_state(2)
            assert meta == {"step": 2}
        for name, tensor in expected_module.state_dict().items():
            assert torch.equal(tensor, module.state_dict()[name]), name


def test_the_cli_exits_2_naming_the_damage_when_no_checkpoint_is_intact(
    two_checkpoints: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = Path(shutil.copytree(two_checkpoints, tmp_path / "ckpt"))
    CORRUPTIONS["flip"](directory / LATEST / "model.safetensors")
    CORRUPTIONS["delete"](directory / PREVIOUS / "state.json")
    args = ["mitk", "sae", "train", "--model", "toy-induction", "--hook",
            "blocks.0.hook_resid_post", "--induction", "4", "--n-sequences", "16",
            "--out", str(tmp_path / "never"), "--checkpoint-dir", str(directory),
            "--resume"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert err.startswith(f"error: no intact checkpoint to resume in {directory}"), err
    assert "latest/model.safetensors: bytes changed in place" in err
    assert "previous/state.json: missing" in err
    assert "Traceback" not in err and not (tmp_path / "never").exists()


def test_a_fresh_run_never_replaces_an_earlier_runs_checkpoints(checkpoints: Path) -> None:
    before = snapshot(checkpoints)
    with pytest.raises(CheckpointExistsError, match="resume it"):
        train(SAE_CFG, sae_source(), checkpoint_dir=checkpoints, progress=False)
    with pytest.raises(CheckpointExistsError, match="pick a new or empty"):
        train_language_model(HookedTransformer(LM, seed=0), lm_batches, LM_CFG, checkpoints,
                             progress=False)  # fmt: skip
    assert snapshot(checkpoints) == before
