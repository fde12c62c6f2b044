"""Resolving a Hugging Face repo id (``"gpt2"``, ``"EleutherAI/pythia-70m"``) to a local snapshot.

Names resolve through the hub cache the way ``transformers`` does: offline
(``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``) only the cache is read; otherwise a
complete cached snapshot is used as is and only a missing or partial one is
downloaded. Only configs, safetensors weights and tokenizer files are fetched, never
pickle checkpoints (``.bin``/``.pt``), so a repo without safetensors is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from pathlib import Path, PurePosixPath
import re

from mitk.errors import HubFileNotFoundError, UnsupportedModelError

# What loading needs; everything else in a repo (other frameworks' weights, pickles) is skipped.
ALLOW_PATTERNS = [
    "config.json",
    "mitk_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
]
# huggingface_hub's own rule (validate_repo_id): an optional namespace, a name, no "--" or "..".
_REPO_ID = re.compile(r"(?!.*(--|\.\.))[\w][\w.-]*(/[\w][\w.-]*)?")
_TRUE = {"1", "on", "yes", "true"}
# A branch, tag or commit: no "..", no leading "/" (the cache reads refs/<revision> from disk).
_REVISION = re.compile(r"(?!.*\.\.)[\w.-][\w./-]*")


def hf_hub_cache() -> Path:
    """The hub cache folder, resolved as ``huggingface_hub`` does (HF_HUB_CACHE, HF_HOME).

    Read from the environment on each call: ``huggingface_hub.constants`` freezes it at
    import, which would ignore later changes (and tests' temporary caches).
    """
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path("~/.cache/huggingface").expanduser()
    return base / "hub"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE asks for the local cache only."""
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_repo_id(name: str) -> bool:
    """True for ``"name"`` or ``"org/name"`` shapes (not paths like ``./x`` or ``a/b/c``)."""
    return len(name) <= 96 and _REPO_ID.fullmatch(name) is not None


def resolve_repo(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (branch, tag or commit).

    Raises ``FileNotFoundError`` when the repo is not cached and cannot be fetched
    (offline, unknown repo or revision, no network), naming the cache searched, and
    ``UnsupportedModelError`` when the repo has no safetensors weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hf_hub_cache()
    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    fetch = f"`hf download {repo_id}" + (f" --revision {revision}" if revision else "") + "`"
    snapshot: Path | None = None
    try:
        found = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=True,
        )
        snapshot = Path(found)
    except LocalEntryNotFoundError as err:
        if hub_offline():
            raise FileNotFoundError(
                f"{at} is not in the Hugging Face cache {cache} and offline mode is on "
                f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); fetch it with {fetch} where the Hub "
                "is reachable, or unset offline mode"
            ) from err
    # A snapshot can be partial (transformers fetched only config.json, or only .bin weights).
    if (snapshot is None or not _complete(snapshot)) and not hub_offline():
        try:
            found = snapshot_download(
                repo_id, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS
            )
            snapshot = Path(found)
        except RepositoryNotFoundError as err:
            raise FileNotFoundError(
                f"no model repo {repo_id!r} on the Hugging Face Hub (if it is private or "
                "gated, log in with `hf auth login`)"
            ) from err
        except RevisionNotFoundError as err:
            raise FileNotFoundError(f"repo {repo_id!r} has no revision {revision!r}") from err
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{at} is not in the Hugging Face cache {cache} and the Hub could not be "
                f"reached ({err}); fetch it with {fetch} where the Hub is reachable"
            ) from err
    assert snapshot is not None  # offline without a snapshot raised above
    if not _complete(snapshot):
        pickles = any(snapshot.glob("*.bin")) or any(snapshot.glob("*.pt"))
        raise UnsupportedModelError(
            f"{at} ({snapshot}) has no config and safetensors weights"
            + (
                " (only pickle checkpoints, which mitk refuses: unpickling can execute code)"
                if pickles
                else ""
            )
            + "; mitk downloads and loads safetensors only"
        )
    return snapshot


def resolve_files(
    repo_id: str,
    filenames: Sequence[str],
    revision: str | None = None,
    *,
    optional: Sequence[str] = (),
) -> Path:
    """The local snapshot directory of ``repo_id`` holding ``filenames`` (paths in the repo).

    The same rules as ``resolve_repo``, file by file: a cached file is used as is, a
    missing one is downloaded unless offline. ``optional`` files are taken when the
    repo has them and skipped otherwise. Raises ``HubFileNotFoundError`` naming the
    cache and the ``hf download`` command that fetches what is missing. The caller
    checks that each name stays inside the repo (no ``..``, not absolute).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not looks_like_repo_id(repo_id):
        raise HubFileNotFoundError(f"{repo_id!r} is not a Hugging Face repo id ('org/name')")
    if revision is not None and (len(revision) > 256 or not _REVISION.fullmatch(revision)):
        raise HubFileNotFoundError(f"{revision!r} is not a branch, tag or commit name")
    cache, offline = hf_hub_cache(), hub_offline()
    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    fetch = (
        f"`hf download {repo_id} {' '.join(filenames)}"
        + (f" --revision {revision}" if revision else "")
        + "`"
    )
    snapshot: Path | None = None
    for name in [*filenames, *optional]:
        required = name in filenames
        found: str | None = None
        try:
            found = hf_hub_download(
                repo_id, name, revision=revision, cache_dir=cache, local_files_only=True
            )
        except LocalEntryNotFoundError as err:
            if offline and required:
                raise HubFileNotFoundError(
                    f"{name} of {at} is not in the Hugging Face cache {cache} and offline "
                    f"mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); fetch it with {fetch} "
                    "where the Hub is reachable, or unset offline mode"
                ) from err
        if found is None and not offline:
            try:
                found = hf_hub_download(repo_id, name, revision=revision, cache_dir=cache)
            except RepositoryNotFoundError as err:
                raise HubFileNotFoundError(
                    f"no repo {repo_id!r} on the Hugging Face Hub (if it is private or gated, "
                    "log in with `hf auth login`)"
                ) from err
            except RevisionNotFoundError as err:
                raise HubFileNotFoundError(
                    f"repo {repo_id!r} has no revision {revision!r}"
                ) from err
            except LocalEntryNotFoundError as err:  # not cached and the Hub unreachable
                if required:
                    raise HubFileNotFoundError(
                        f"{name} of {at} is not in the Hugging Face cache {cache} and the Hub "
                        f"could not be reached ({err}); fetch it with {fetch} where it is"
                    ) from err
            except EntryNotFoundError as err:  # the Hub answered: no such file
                if required:
                    raise HubFileNotFoundError(f"{at} has no file {name}") from err
        if found is not None and snapshot is None:
            snapshot = Path(found).parents[len(PurePosixPath(name).parts) - 1]
    if snapshot is None:
        raise HubFileNotFoundError(f"no files asked of {at}")
    return snapshot


def _complete(snapshot: Path) -> bool:
    """True when ``snapshot`` holds a config and all of its safetensors weights."""
    if not (snapshot / "config.json").is_file() and not (snapshot / "mitk_config.json").is_file():
        return False
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, OSError):
            return False
        return all((snapshot / shard).is_file() for shard in shards)
    return (snapshot / "model.safetensors").is_file()
