"""Reading checkpoint files safely: safetensors only, single or sharded, inside their directory.

Every file a model directory names (its config, weights, shard index entries,
tokenizer files) must resolve inside that directory, symlinks included; a hub
snapshot's links into its repo's ``blobs/`` folder are the one exception. Anything
else, and any unreadable or malformed file, raises ``ModelFileError`` naming the
file and the entry or tensor at fault.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mitk.atomic import atomic_write
from mitk.config import json_object
from mitk.errors import ConfigError, ModelFileError, UnsupportedModelError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "vocab.txt")
# tokenizer files that must parse as JSON before transformers reads them
TOKENIZER_JSON = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)
SHARD_INDEX = "model.safetensors.index.json"


def contained(directory: Path, name: object, referrer: str) -> Path:
    """``directory / name`` if it resolves inside ``directory``; ``ModelFileError`` otherwise.

    ``referrer`` says where ``name`` came from (``"index.json weight_map['w']"``) for
    the message. Absolute names, ``..`` and symlinks leading out are refused; a hub
    snapshot (``.../snapshots/<rev>/``) may link into its repo's ``blobs/``.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelFileError(f"{referrer}: {name!r} is not a file name")
    parts = PurePosixPath(name).parts
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or ".." in parts
        or "\\" in name
    ):
        raise ModelFileError(f"{referrer}: {name!r} lies outside the model directory {directory}")
    path = directory / name
    roots = [directory.resolve()]
    if directory.resolve().parent.name == "snapshots":
        roots.append(directory.resolve().parent.parent / "blobs")
    target = path.resolve()
    if not any(target == root or target.is_relative_to(root) for root in roots):
        raise ModelFileError(
            f"{referrer}: {name!r} resolves to {target}, outside the model directory {directory}"
        )
    return path


def read_json_file(directory: Path, name: str) -> dict[str, Any]:
    """The JSON object in ``directory/name`` (contained); ``ConfigError`` naming it otherwise."""
    path = contained(directory, name, str(directory))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as UTF-8 text: {err}") from err
    return json_object(text, str(path))


def read_safetensors_dir(directory: Path) -> dict[str, Tensor]:
    """Every tensor in ``directory``'s safetensors file(s), following a shard index if present.

    Pickle-based ``.bin`` checkpoints are refused: unpickling can run arbitrary code.
    """
    if (directory / SHARD_INDEX).exists():
        state: dict[str, Tensor] = {}
        for shard, names in shard_files(directory).items():
            tensors = read_safetensors(shard)
            missing = sorted(set(names) - set(tensors))
            if missing:
                raise ModelFileError(
                    f"{shard}: lacks tensor(s) {', '.join(missing[:5])} that "
                    f"{directory / SHARD_INDEX} places there"
                )
            state.update(tensors)
        return state
    single = directory / "model.safetensors"
    if single.exists():
        return read_safetensors(contained(directory, single.name, str(directory)))
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise UnsupportedModelError(
            f"{directory} holds only pickle checkpoints (.bin/.pt); mitk loads safetensors only "
            "because unpickling can execute code. Convert with "
            "model.save_pretrained(dir, safe_serialization=True) in a trusted environment."
        )
    raise FileNotFoundError(f"no model.safetensors (or shard index) in {directory}")


def shard_files(directory: Path) -> dict[Path, list[str]]:
    """Each shard the index names (contained in ``directory``) -> the tensors it should hold."""
    index = directory / SHARD_INDEX
    weight_map = read_json_file(directory, SHARD_INDEX).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFileError(f"{index}: field 'weight_map' must be an object of tensor -> file")
    shards: dict[Path, list[str]] = {}
    for tensor, shard in weight_map.items():
        entry = f"{index} weight_map[{tensor!r}]"
        path = contained(directory, shard, entry)
        if not path.is_file():
            raise ModelFileError(f"{entry}: {shard!r} is not a file in {directory}")
        shards.setdefault(path, []).append(tensor)
    return shards


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files loading ``directory`` reads (contained), for size estimates."""
    if (directory / SHARD_INDEX).exists():
        return list(shard_files(directory))
    single = directory / "model.safetensors"
    return [contained(directory, single.name, str(directory))] if single.exists() else []


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of one safetensors file; ``ModelFileError`` naming it if it is malformed."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path}: not a readable safetensors file ({err})") from err


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Write safetensors atomically (``mitk.atomic``): readers never see half a file."""
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temp: save_file(contiguous, temp))


def has_tokenizer(directory: Path) -> bool:
    """True when ``directory`` holds files a Hugging Face tokenizer loads from."""
    return any((directory / f).exists() for f in TOKENIZER_FILES)


def check_tokenizer_files(directory: Path) -> None:
    """Refuse tokenizer files that are not JSON or that name files outside ``directory``.

    Run before ``AutoTokenizer.from_pretrained``, which would otherwise fail deep
    inside ``transformers`` or open a path a ``*_file(s)`` entry points at.
    """
    for name in TOKENIZER_JSON:
        if not (directory / name).exists():
            continue
        data = read_json_file(directory, name)
        if name != "tokenizer_config.json":
            continue
        for key, value in data.items():
            if key.endswith(("_file", "_files")) and value is not None:
                for entry in value if isinstance(value, list) else [value]:
                    contained(directory, entry, f"{directory / name} field {key!r}")
    for name in ("vocab.txt", "merges.txt", "tokenizer.model"):
        if (directory / name).exists():
            contained(directory, name, str(directory))
