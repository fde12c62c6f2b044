"""Pretrained SAEs named in SAELens's registry, loaded through the Hugging Face cache.

SAELens lists its pretrained SAEs in ``pretrained_saes.yaml``: each release names a
Hub repo (``repo_id``) and its SAEs (``saes``: an ``id`` and the ``path`` of its
folder in the repo), with optional ``config_overrides`` for the whole release and a
``norm_scaling_factor`` per SAE. ``from_pretrained`` reads that file from an
installed ``sae_lens`` (or the ``registry=`` given), resolves the SAE's ``cfg.json``
and ``sae_weights.safetensors`` the way model loading resolves a repo (offline, the
cache only: ``mitk.model.pretrained.hub``) and loads the folder with ``load_sae``.

The registry is untrusted input: safe YAML of bounded size, every field used is
type-checked, and an SAE's path must stay inside its repo. Releases that SAELens
converts from other formats (``conversion_func``) are refused; nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
import importlib.util
import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
import yaml

from mitk.config import json_object
from mitk.errors import ConfigError, HubFileNotFoundError, UnknownNameError, UnsupportedModelError
from mitk.model.pretrained.hub import looks_like_repo_id, resolve_files
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.files import EXACT_FILE, load_sae
from mitk.sae.saelens_format import CONFIG_FILE, WEIGHTS_FILE

REGISTRY_FILE = "pretrained_saes.yaml"
"""The registry's file name inside the ``sae_lens`` package."""
MAX_REGISTRY_BYTES = 64 * 2**20  # SAELens's own is about 1.5 MB
_MAX_PATH_CHARS = 1024
# SAELens folds the registry's norm_scaling_factor into the weights for this setting only
_SCALED_INPUT = "expected_average_only_in"

# config_overrides keys that change what the SAE computes (load_sae refuses what it cannot
# reproduce), and keys that only describe the model and data it was trained on
_APPLIED_OVERRIDES: dict[str, tuple[type, ...]] = {
    "hook_name": (str,),
    "normalize_activations": (str, bool, type(None)),
}
_DESCRIPTIVE_OVERRIDES = frozenset(
    {
        "context_size",
        "dataset_path",
        "dataset_trust_remote_code",
        "exclude_special_tokens",
        "model_class_name",
        "model_from_pretrained_kwargs",
        "model_name",
        "neuronpedia_id",
        "prepend_bos",
        "seqpos_slice",
    }
)

Registry = str | os.PathLike[str] | Mapping[str, Any]
"""A registry file (YAML in ``pretrained_saes.yaml``'s format) or its parsed contents."""


@dataclass(frozen=True)
class PretrainedSAE:
    """One SAE of the registry: where its folder lives and what loading it applies."""

    release: str
    sae_id: str
    repo_id: str
    path: str
    """The SAE's folder inside the repo (relative, ``/``-separated, no ``..``)."""
    conversion_func: str | None
    """SAELens's converter for releases in other formats; ``None`` for SAELens folders."""
    config_overrides: Mapping[str, Any]
    """The release's ``cfg.json`` replacements that change the SAE (``hook_name``,
    ``normalize_activations``); those describing its training data are dropped."""
    norm_scaling_factor: float | None
    """Input scale the SAE was trained with, folded into the weights on load."""


# --- loading --------------------------------------------------------------------------------
def from_pretrained(
    release: str,
    sae_id: str,
    *,
    device: str | torch.device | None = None,
    registry: Registry | None = None,
    revision: str | None = None,
) -> SparseAutoencoder:
    """Load SAE ``sae_id`` of ``release`` (SAELens's names) from the Hugging Face cache.

    ``registry`` is a YAML file in SAELens's ``pretrained_saes.yaml`` format, or its
    parsed contents; by default the installed ``sae_lens`` package's. ``revision``
    picks a branch, tag or commit of the release's repo. Offline (``HF_HUB_OFFLINE``)
    only the cache is read; otherwise missing files are downloaded. As SAELens does,
    the release's ``config_overrides`` apply and a ``norm_scaling_factor`` is folded
    into the weights, so the SAE reads raw activations. Overrides that describe the
    model and data it was trained on (``model_from_pretrained_kwargs``,
    ``dataset_path``, ...) are not applied: load the model as they say.

    Raises ``UnknownNameError`` (with close matches) for an unknown release or id,
    ``ConfigError`` for a malformed registry, ``UnsupportedModelError`` for a release
    SAELens converts from another format, ``HubFileNotFoundError`` when the files are
    neither cached nor fetchable, and what ``load_sae`` raises for the folder.
    """
    entry = lookup(release, sae_id, registry=registry)
    if entry.conversion_func is not None:
        raise UnsupportedModelError(
            f"release {release!r} is stored in another format, which SAELens converts with "
            f"its {entry.conversion_func!r} loader; mitk reads SAELens folders ({CONFIG_FILE} "
            f"and {WEIGHTS_FILE}) only. Convert it once with SAELens "
            f"(SAE.from_pretrained(release, sae_id).save_model(folder)) and load that folder "
            "with SparseAutoencoder.load(folder)"
        )
    inside = PurePosixPath(entry.path)
    try:
        snapshot = resolve_files(
            entry.repo_id,
            [str(inside / CONFIG_FILE), str(inside / WEIGHTS_FILE)],
            revision,
            optional=[str(inside / EXACT_FILE)],
        )
    except HubFileNotFoundError as err:
        raise HubFileNotFoundError(
            f"pretrained SAE {sae_id!r} of release {release!r}: {err}"
        ) from err
    folder = snapshot / inside
    overrides = dict(entry.config_overrides)
    scale = _input_scale(entry, folder / CONFIG_FILE, overrides)
    sae = load_sae(folder, device, overrides=overrides)
    if scale is not None:
        sae.fold_input_scale_(scale)
    return sae


def _input_scale(entry: PretrainedSAE, cfg_file: Path, overrides: dict[str, Any]) -> float | None:
    """The registry's input scale, if the SAE expects scaled inputs; then marks them folded."""
    if entry.norm_scaling_factor is None:
        return None
    raw = json_object(cfg_file.read_text(), str(cfg_file)) | overrides
    setting = raw.get("normalize_activations")
    if setting is not True and setting != _SCALED_INPUT:  # True: SAELens < 6 wrote it so
        return None  # SAELens ignores the factor too
    overrides["normalize_activations"] = "none"
    return entry.norm_scaling_factor


# --- the registry ---------------------------------------------------------------------------
def list_pretrained(release: str | None = None, *, registry: Registry | None = None) -> list[str]:
    """The registry's release names, or the SAE ids of ``release``, in the registry's order."""
    source, releases = _releases(registry)
    if release is None:
        return list(releases)
    return list(_release_saes(source, release, releases))


def lookup(release: str, sae_id: str, *, registry: Registry | None = None) -> PretrainedSAE:
    """The registry's entry for ``sae_id`` of ``release``, every field checked."""
    for name, value in (("release", release), ("sae_id", sae_id)):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
    source, releases = _releases(registry)
    saes = _release_saes(source, release, releases)
    if sae_id not in saes:
        raise UnknownNameError(sae_id, saes, f"SAE id of release {release!r}")
    info, item = releases[release], saes[sae_id]
    where = f"{source}: release {release!r}, SAE {sae_id!r}"
    repo_id = info.get("repo_id")
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise ConfigError(f"{where}: repo_id must be a Hub repo id ('org/name'): {repo_id!r:.80}")
    conversion = info.get("conversion_func")
    if conversion is not None and not isinstance(conversion, str):
        raise ConfigError(f"{where}: conversion_func must be a string, got {conversion!r:.80}")
    return PretrainedSAE(
        release=release,
        sae_id=sae_id,
        repo_id=repo_id,
        path=_sae_path(where, item.get("path")),
        conversion_func=conversion,
        config_overrides=_overrides(where, info.get("config_overrides")),
        norm_scaling_factor=_scale(where, item.get("norm_scaling_factor")),
    )


def installed_registry() -> Path | None:
    """SAELens's ``pretrained_saes.yaml`` when ``sae_lens`` is installed (it is not imported)."""
    spec = importlib.util.find_spec("sae_lens")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / REGISTRY_FILE
        if candidate.is_file():
            return candidate
    return None


def _releases(registry: Registry | None) -> tuple[str, Mapping[str, Any]]:
    """(a name for error messages, the release mapping) of ``registry``."""
    if registry is None:
        path = installed_registry()
        if path is None:
            raise ConfigError(
                "no SAE registry to read: sae_lens is not installed. Pass registry= a YAML file "
                f"in SAELens's {REGISTRY_FILE} format (or its parsed dict), or install sae_lens"
            )
        registry = path
    if isinstance(registry, Mapping):
        source, data = "the registry passed", registry
    elif isinstance(registry, (str, os.PathLike)):
        source = str(registry)
        data = _parse_registry(_read_registry(Path(registry)), source)
    else:
        raise ConfigError(
            f"registry must be a YAML file's path or a mapping, got {type(registry).__name__}"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must map release names to releases, not {type(data).__name__}")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"{source}: release names must be strings, got {odd[0]!r:.80}")
    return source, data


def _read_registry(path: Path) -> bytes:
    """The bytes of a registry file, at most ``MAX_REGISTRY_BYTES``."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_REGISTRY_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read the SAE registry {path}: {err}") from err
    if len(data) > MAX_REGISTRY_BYTES:
        raise ConfigError(f"the SAE registry {path} is larger than {MAX_REGISTRY_BYTES} bytes")
    return data


@lru_cache(maxsize=4)  # SAELens's registry takes about a second to parse; keyed on the bytes
def _parse_registry(data: bytes, source: str) -> Any:
    """The YAML in ``data``, loaded safely (plain data only, nesting depth bounded)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"the SAE registry {source} is not UTF-8 text: {err}") from err
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml bounds nesting depth
    try:
        return yaml.load(text, Loader=loader)  # a safe loader: plain data only
    except Exception as err:  # any failure of the parser means the file is malformed
        raise ConfigError(f"the SAE registry {source} is not valid YAML: {err}") from err


def _release_saes(
    source: str, release: str, releases: Mapping[str, Any]
) -> dict[str, Mapping[str, Any]]:
    """The SAEs of ``release`` by id; ``UnknownNameError`` with close matches if it is absent."""
    if release not in releases:
        raise UnknownNameError(release, releases, "pretrained SAE release")
    info = releases[release]
    where = f"{source}: release {release!r}"
    if not isinstance(info, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(info).__name__}")
    items = info.get("saes")
    if not isinstance(items, list):
        raise ConfigError(f"{where}: 'saes' must be a list of {{id, path}}, got {items!r:.80}")
    saes: dict[str, Mapping[str, Any]] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: saes[{i}] must be a mapping, got {item!r:.80}")
        sae_id = item.get("id")
        if not isinstance(sae_id, str):
            raise ConfigError(f"{where}: saes[{i}].id must be a string, got {sae_id!r:.80}")
        if sae_id in saes:
            raise ConfigError(f"{where}: SAE id {sae_id!r} is listed twice")
        saes[sae_id] = item
    return saes


def _sae_path(where: str, path: Any) -> str:
    """The SAE's folder in its repo, checked to stay inside it."""
    if isinstance(path, int) and not isinstance(path, bool):
        path = str(path)  # SAELens accepts numeric folder names
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH_CHARS:
        raise ConfigError(f"{where}: path must be a non-empty folder name, got {path!r:.80}")
    parts = path.split("/")
    if (
        PurePosixPath(path).is_absolute()
        or PureWindowsPath(path).anchor
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(c) < 32 or c == "\\" for c in path)
    ):
        raise ConfigError(
            f"{where}: path {path!r:.80} must be a relative folder inside the repo "
            "('/'-separated, no '..', '.', empty or absolute parts)"
        )
    return path


def _overrides(where: str, overrides: Any) -> dict[str, Any]:
    """The release's ``config_overrides`` that change the SAE; the rest describe its training."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: config_overrides must be a mapping, got {overrides!r:.80}")
    applied: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _DESCRIPTIVE_OVERRIDES:
            continue
        kinds = _APPLIED_OVERRIDES.get(key) if isinstance(key, str) else None
        if kinds is None:
            raise ConfigError(
                f"{where}: config_overrides sets {key!r:.80}, which mitk does not apply (it "
                f"applies {', '.join(sorted(_APPLIED_OVERRIDES))}; ignores "
                f"{', '.join(sorted(_DESCRIPTIVE_OVERRIDES))})"
            )
        if not isinstance(value, kinds):
            raise ConfigError(f"{where}: config_overrides.{key} has the wrong type: {value!r:.80}")
        applied[key] = value
    return applied


def _scale(where: str, factor: Any) -> float | None:
    if factor is None:
        return None
    if (
        not isinstance(factor, (int, float))
        or isinstance(factor, bool)
        or not math.isfinite(factor)
        or factor <= 0
    ):
        raise ConfigError(
            f"{where}: norm_scaling_factor must be a positive finite number, got {factor!r:.80}"
        )
    return float(factor)
