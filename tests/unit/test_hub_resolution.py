"""Repo ids resolve through a Hugging Face cache built in tmp_path; nothing touches the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.hub import looks_like_repo_id, resolve_repo
from tests.checkpoints import save_gpt2

MAIN = "a" * 40
STEP = "b" * 40
REPO = "someorg/tiny-gpt2"


def _snapshot(cache: Path, repo: str, commit: str, ref: str | None = "main") -> Path:
    """A snapshot folder as huggingface_hub lays it out (files stored directly, blobs omitted).

    Offline, ``snapshot_download`` only reads ``refs/<ref>`` and checks the snapshot
    folder exists, so symlinks into ``blobs/`` are not needed.
    """
    storage = cache / f"models--{repo.replace('/', '--')}"
    if ref is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache the environment points at, offline."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (home / "hub").mkdir(parents=True)
    return home / "hub"


def _logits(model: HookedTransformer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 7, 2, 9]]))


def test_repo_id_loads_like_its_directory(cache: Path) -> None:
    snapshot = save_gpt2(_snapshot(cache, REPO, MAIN))
    from_hub = HookedTransformer.from_pretrained(REPO)
    direct = HookedTransformer.from_pretrained(snapshot)
    assert from_hub.tokenizer is not None
    assert from_hub.to_str_tokens("the cat sat", prepend_bos=False) == ["the", "cat", "sat"]
    torch.testing.assert_close(_logits(from_hub), _logits(direct), rtol=0, atol=0)


def test_revision_selects_another_snapshot(cache: Path) -> None:
    main = save_gpt2(_snapshot(cache, REPO, MAIN), seed=0)
    step = save_gpt2(_snapshot(cache, REPO, STEP, ref="step1000"), seed=1)
    assert resolve_repo(REPO) == main.resolve()
    assert resolve_repo(REPO, revision="step1000") == step.resolve()
    assert resolve_repo(REPO, revision=STEP) == step.resolve()  # a commit hash needs no ref
    model = HookedTransformer.from_pretrained(REPO, revision="step1000")
    torch.testing.assert_close(_logits(model), _logits(HookedTransformer.from_pretrained(step)))
    assert not torch.allclose(_logits(model), _logits(HookedTransformer.from_pretrained(main)))


def test_missing_offline_names_the_cache(cache: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        HookedTransformer.from_pretrained("someorg/absent")
    message = str(info.value)
    assert str(cache) in message and "offline" in message
    assert "hf download someorg/absent" in message
    assert "not a directory holding a checkpoint" in message  # the local-path error still reads
    with pytest.raises(FileNotFoundError, match="revision 'nope'"):
        resolve_repo(REPO, revision="nope")


def test_pickle_only_snapshot_is_refused(cache: Path) -> None:
    snapshot = _snapshot(cache, REPO, MAIN)
    (snapshot / "config.json").write_text('{"model_type": "gpt2"}')
    (snapshot / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        HookedTransformer.from_pretrained(REPO)


def test_online_uses_a_complete_cache_without_network(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online, a complete cached snapshot is used as is; only a partial one is downloaded."""
    complete = save_gpt2(_snapshot(cache, REPO, MAIN), with_tokenizer=False)
    partial = _snapshot(cache, "someorg/partial", MAIN)
    (partial / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    real = huggingface_hub.snapshot_download
    calls: list[tuple[str, bool]] = []

    def no_network(repo_id: str, **kwargs: Any) -> Any:
        calls.append((repo_id, bool(kwargs.get("local_files_only"))))
        if not kwargs.get("local_files_only"):
            assert "*.bin" not in kwargs["allow_patterns"]
            save_gpt2(partial, with_tokenizer=False)  # stands in for the download
            return str(partial)
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert resolve_repo(REPO) == complete.resolve()
    assert calls == [(REPO, True)]
    assert resolve_repo("someorg/partial") == partial
    assert calls[1:] == [("someorg/partial", True), ("someorg/partial", False)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gpt2", True), ("EleutherAI/pythia-70m", True), ("./x", False), ("a/b/c", False),
     ("/abs/dir", False), ("a--b", False), ("", False)],
)  # fmt: skip
def test_looks_like_repo_id(name: str, expected: bool) -> None:
    assert looks_like_repo_id(name) is expected
