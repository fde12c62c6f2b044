"""Circuit-tracer's transcoder sets (``config.yaml`` + one safetensors file per layer) in mitk.

``load_transcoder_set(path)`` reads a set into one ``SparseAutoencoder``
transcoder per layer (reading ``blocks.L.ln2.hook_normalized`` or
``blocks.L.hook_resid_mid``, writing ``blocks.L.hook_mlp_out``), the list
``mitk.analysis.graphs.attribution_graph`` takes. ``save_transcoder_set`` writes
mitk transcoders in the same format, which circuit-tracer's own loaders read
(``load_transcoder_set`` with the layer files, or its cache loader with the folder).

The format (circuit-tracer 0.5.0): ``config.yaml`` holds ``model_kind:
transcoder_set``, ``feature_input_hook`` and ``feature_output_hook`` (after
``blocks.L.``), an optional ``scan`` label and ``model_name``, and either
``transcoders`` (one file per layer, in layer order) or nothing, in which case
the files are ``layer_0.safetensors``, ``layer_1.safetensors``, ... beside it.
Each file holds ``W_enc [d_sae, d_model]`` (one row per latent: the transpose of
mitk's), ``W_dec [d_sae, d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``, an
optional ``W_skip [d_model, d_model]`` (as mitk's) and, for JumpReLU,
``activation_function.threshold [d_sae]``; without a threshold it is ReLU. The
encoder never subtracts ``b_dec``. A ``transcoders`` entry may also name a
SAELens transcoder folder (``cfg.json`` + ``sae_weights.safetensors``), which
``SparseAutoencoder.load`` reads.

The files are untrusted: YAML through ``yaml.safe_load``, every path inside the
set's folder, sizes bounded before anything is read, every shape checked
against the others; each refusal names the file and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
import torch
from torch import Tensor
import yaml

from mitk.atomic import atomic_folder
from mitk.config import TORCH_DTYPES
from mitk.errors import ConfigError, ShapeMismatchError, UnsupportedModelError
from mitk.model.pretrained.files import contained, read_safetensors
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig, SAEDType
from mitk.sae.saelens_format import to_log_threshold

CONFIG_NAME = "config.yaml"
LAYER_FILE = "layer_{}.safetensors"
THRESHOLD = "activation_function.threshold"
MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 1024
MAX_FILE_BYTES = 64 << 30
"""A per-layer file larger than this is refused before it is read (``max_file_bytes`` lifts it)."""

# circuit-tracer's hook names (after ``blocks.L.``) -> mitk's
INPUT_HOOKS = ("ln2.hook_normalized", "hook_resid_mid")
"""Hooks a layer may read: the same names, and the same values, in TransformerLens and mitk."""
MLP_HOOK_IN = "mlp.hook_in"
"""circuit-tracer's hook on the MLP's input: after ln2's weight and bias, where mitk has no hook."""
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")  # the same value: the MLP's output
_KNOWN_KEYS = {
    "model_kind", "feature_input_hook", "feature_output_hook", "transcoders", "scan",
    "model_name", "repo_id", "revision", "subfolder",
}  # fmt: skip
_TENSORS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", THRESHOLD}


# --- reading ------------------------------------------------------------------------------
def load_transcoder_set(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: SAEDType = "float32",
    max_file_bytes: int = MAX_FILE_BYTES,
    norms_folded: bool = False,
) -> list[SparseAutoencoder]:
    """One mitk transcoder per layer from a circuit-tracer set (its ``config.yaml`` or folder).

    Weights are converted to ``dtype`` (``"float32"`` by default, as circuit-tracer
    loads them). A set reading circuit-tracer's ``mlp.hook_in`` (the MLP input after
    ln2's weight and bias) loads only with ``norms_folded=True``, a promise that the
    model it is used with has ln2 weights 1 and biases 0 (``process_weights(fold_ln=True)``),
    where ``ln2.hook_normalized`` is that same input. Cross-layer transcoders,
    ``hf://`` references, ``.npz`` files (Gemma Scope's originals) and any key or
    tensor this loader does not know are refused by name (``ConfigError``, ``ShapeMismatchError`` or
    ``UnsupportedModelError``).
    """
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    config_file = Path(path)
    if config_file.is_dir():
        config_file = config_file / CONFIG_NAME
    folder = config_file.parent
    raw = read_set_config(config_file)
    where = str(config_file)
    if raw["model_kind"] == "cross_layer_transcoder":
        raise UnsupportedModelError(
            f"{config_file}: model_kind 'cross_layer_transcoder' is one cross-layer transcoder, "
            "not a per-layer set; read it with mitk.sae.load_clt"
        )
    reads = _input_hook_of(raw, where, norms_folded)
    _hook(raw, "feature_output_hook", OUTPUT_HOOKS, where)
    writes = "hook_mlp_out"  # circuit-tracer's mlp.hook_out is the same value
    files = _layer_files(raw, folder, where)
    transcoders = []
    for layer, file in enumerate(files):
        if file.is_dir():
            sae = SparseAutoencoder.load(file)
            sae = sae.to(TORCH_DTYPES[dtype]) if sae.cfg.dtype != dtype else sae
        else:
            sae = _read_layer(file, layer, reads, writes, dtype, max_file_bytes)
        _check_hooks(sae, layer, reads, writes, file)
        transcoders.append(sae)
    _check_same_widths(transcoders, files)
    return [t.to(device) for t in transcoders] if device is not None else transcoders


def read_set_config(config_file: Path) -> dict[str, Any]:
    """A ``config.yaml`` of circuit-tracer's, read safely and bounded; its keys and kind checked."""
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no transcoder-set {CONFIG_NAME} there")
    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config_file}: {size} bytes; a {CONFIG_NAME} is at most 1 MiB")
    try:
        raw = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_file}: not readable YAML ({err})") from err
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{config_file}: must be a mapping of names to values")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{config_file}: unknown key(s) {unknown} (known: {sorted(_KNOWN_KEYS)})")
    kind = raw.get("model_kind")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise ConfigError(
            f"{config_file}: model_kind must be 'transcoder_set' or 'cross_layer_transcoder', "
            f"got {kind!r}"
        )
    return raw


def _hook(raw: dict[str, Any], key: str, known: Sequence[str], where: str) -> str:
    value = raw.get(key)
    if value not in known:
        raise ConfigError(f"{where}: {key} must be one of {sorted(known)}, got {value!r}")
    return str(value)


def _input_hook_of(raw: dict[str, Any], where: str, norms_folded: bool) -> str:
    if raw.get("feature_input_hook") == MLP_HOOK_IN:
        if not norms_folded:
            raise UnsupportedModelError(
                f"{where}: feature_input_hook {MLP_HOOK_IN!r} is the MLP input after ln2's "
                "weight and bias, which no mitk hook holds; fold the model's norms "
                "(process_weights(fold_ln=True)) and load with norms_folded=True"
            )
        return "ln2.hook_normalized"
    return _hook(raw, "feature_input_hook", (*INPUT_HOOKS, MLP_HOOK_IN), where)


def _layer_files(raw: dict[str, Any], folder: Path, where: str) -> list[Path]:
    """The per-layer files in layer order, each contained in ``folder``."""
    listed = raw.get("transcoders")
    if listed is None:
        names: list[str] = []
        while len(names) <= MAX_LAYERS and (folder / LAYER_FILE.format(len(names))).exists():
            names.append(LAYER_FILE.format(len(names)))
        if not names:
            raise ConfigError(f"{where}: no 'transcoders' list and no {LAYER_FILE.format(0)}")
        strays = [p.name for p in folder.glob("layer_*.safetensors") if p.name not in names]
        if strays:
            raise ConfigError(
                f"{where}: layer files must run from layer_0 without gaps; "
                f"{sorted(strays)[:5]} follow a missing layer"
            )
    elif isinstance(listed, list) and listed and all(isinstance(n, str) for n in listed):
        names = listed
    else:
        raise ConfigError(f"{where}: 'transcoders' must be a non-empty list of file names")
    if len(names) > MAX_LAYERS:
        raise ConfigError(f"{where}: {len(names)} layers; at most {MAX_LAYERS} are read")
    files = []
    for layer, name in enumerate(names):
        referrer = f"{where} transcoders[{layer}]"
        if name.startswith("hf://"):
            raise ConfigError(
                f"{referrer}: {name!r} is a hub reference; mitk reads local files only "
                "(download the set and list the files relative to its folder)"
            )
        if name.endswith(".npz"):
            raise UnsupportedModelError(f"{referrer}: {name!r} is .npz; only safetensors are read")
        # an absolute name is accepted when it lies inside the folder
        relative = _relative_to(folder, name)
        file = contained(folder, relative, referrer)
        if not file.exists():
            raise FileNotFoundError(f"{referrer}: {name!r} does not exist in {folder}")
        files.append(file)
    return files


def _relative_to(folder: Path, name: str) -> str:
    if not Path(name).is_absolute():
        return name
    try:
        return str(Path(name).relative_to(folder.resolve()))
    except ValueError:
        return name  # ``contained`` refuses it by name


def _read_layer(
    file: Path, layer: int, reads: str, writes: str, dtype: SAEDType, max_bytes: int
) -> SparseAutoencoder:
    tensors = read_bounded(file, max_bytes)
    check_tensor_names(tensors, {"W_enc", "W_dec", "b_enc", "b_dec"}, _TENSORS, file)
    d_sae = _shape(tensors["b_enc"], file, "b_enc")[0]
    d_model = _shape(tensors["b_dec"], file, "b_dec")[0]
    expected = {
        "W_enc": (d_sae, d_model), "W_dec": (d_sae, d_model), "b_enc": (d_sae,),
        "b_dec": (d_model,), "W_skip": (d_model, d_model), THRESHOLD: (d_sae,),
    }  # fmt: skip
    check_tensor_shapes(tensors, expected, file, f"b_enc and b_dec make d_sae={d_sae}, "
                        f"d_model={d_model}, so it must be")  # fmt: skip
    threshold = tensors.get(THRESHOLD)
    if threshold is not None and bool((threshold < 0).any()):
        # circuit-tracer's JumpReLU is x * (x > t): a negative t lets negative values through,
        # which mitk's (ReLU-gated) JumpReLU does not compute
        raise UnsupportedModelError(f"{file}: {THRESHOLD} has negative entries")
    cfg = SAEConfig(
        d_in=d_model, d_sae=d_sae, d_out=d_model,
        architecture="relu" if threshold is None else "jumprelu",
        hook_name=f"blocks.{layer}.{reads}", target_hook_name=f"blocks.{layer}.{writes}",
        skip_connection="W_skip" in tensors, apply_b_dec_to_input=False, dtype=dtype,
    )  # fmt: skip
    to = TORCH_DTYPES[dtype]
    state = {
        "W_enc": tensors["W_enc"].T,
        "W_dec": tensors["W_dec"],
        "b_enc": tensors["b_enc"],
        "b_dec": tensors["b_dec"],
    }
    if "W_skip" in tensors:
        state["W_skip"] = tensors["W_skip"]
    if threshold is not None:
        state["log_threshold"] = to_log_threshold(threshold.to(to))
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict({k: v.to(to).contiguous() for k, v in state.items()})
    return sae


def read_bounded(file: Path, max_bytes: int) -> dict[str, Tensor]:
    """The tensors of one safetensors file, refused unread when larger than ``max_bytes``."""
    size = file.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{file}: {size} bytes exceeds max_file_bytes={max_bytes}")
    return read_safetensors(file)


def check_tensor_names(
    tensors: dict[str, Tensor], required: set[str], allowed: set[str], file: Path
) -> None:
    """``ConfigError`` naming the unknown (not in ``allowed``) and missing tensors of ``file``."""
    unknown = sorted(set(tensors) - allowed - required)
    missing = sorted(required - set(tensors))
    if unknown or missing:
        parts = [f"unknown tensor(s) {unknown}"] if unknown else []
        parts += [f"missing tensor(s) {missing}"] if missing else []
        raise ConfigError(f"{file}: {'; '.join(parts)}")


def check_tensor_shapes(
    tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], file: Path, why: str
) -> None:
    """Every tensor floating-point and of its expected shape (``why`` says whence it comes)."""
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ShapeMismatchError(
                f"{file}: {name} has shape {tuple(tensor.shape)}; {why} {expected[name]}"
            )
        if not tensor.is_floating_point():
            raise ConfigError(f"{file}: {name} is {tensor.dtype}, not a floating-point tensor")


def _shape(tensor: Tensor, file: Path, name: str) -> tuple[int, ...]:
    if tensor.dim() != 1 or tensor.shape[0] == 0:
        raise ShapeMismatchError(
            f"{file}: {name} must be a non-empty vector, not {tuple(tensor.shape)}"
        )
    return tuple(tensor.shape)


def _check_hooks(sae: SparseAutoencoder, layer: int, reads: str, writes: str, file: Path) -> None:
    cfg = sae.cfg
    want = (f"blocks.{layer}.{reads}", f"blocks.{layer}.{writes}")
    if (cfg.hook_name, cfg.target_hook_name) != want:
        raise ConfigError(
            f"{file}: reads {cfg.hook_name!r} and writes {cfg.target_hook_name!r}; as layer "
            f"{layer} of this set it must read {want[0]!r} and write {want[1]!r}"
        )


def _check_same_widths(transcoders: list[SparseAutoencoder], files: list[Path]) -> None:
    d_model = transcoders[0].cfg.d_in
    for sae, file in zip(transcoders, files, strict=True):
        if sae.cfg.d_in != d_model or sae.cfg.d_out != d_model:
            raise ShapeMismatchError(
                f"{file}: maps width {sae.cfg.d_in} to {sae.cfg.d_out}; layer 0's maps "
                f"{d_model} to {d_model}"
            )


# --- writing ------------------------------------------------------------------------------
def save_transcoder_set(
    transcoders: Sequence[SparseAutoencoder], directory: str | Path, *, scan: str | None = None
) -> Path:
    """Write per-layer transcoders as a circuit-tracer set (config.yaml, layer_L.safetensors).

    ``transcoders[L]`` must read ``blocks.L.ln2.hook_normalized`` or
    ``blocks.L.hook_resid_mid`` (names TransformerLens shares), all the same one,
    and write ``blocks.L.hook_mlp_out``; ReLU and JumpReLU only (what circuit-tracer's
    loader reads). The folder is written atomically and must not exist yet.
    """
    if not transcoders:
        raise ConfigError("a transcoder set needs at least one transcoder")
    reads = {_input_hook(sae, layer) for layer, sae in enumerate(transcoders)}
    if len(reads) != 1:
        raise ConfigError(f"the transcoders read different hooks {sorted(reads)}; a set reads one")
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} exists; a transcoder set is written to a new folder")
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": reads.pop(),
        "feature_output_hook": "hook_mlp_out",
        "scan": scan if scan is not None else target.name,
    }
    with atomic_folder(target) as staging:
        for layer, sae in enumerate(transcoders):
            save_file(_layer_tensors(sae), staging / LAYER_FILE.format(layer))
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def _input_hook(sae: SparseAutoencoder, layer: int) -> str:
    cfg = sae.cfg
    prefix = f"blocks.{layer}."
    hook = cfg.hook_name.removeprefix(prefix)
    if not cfg.hook_name.startswith(prefix) or hook not in INPUT_HOOKS:
        raise ConfigError(
            f"transcoder {layer} reads {cfg.hook_name!r}; a set's layer {layer} reads "
            f"{prefix}ln2.hook_normalized or {prefix}hook_resid_mid"
        )
    if cfg.target_hook_name != f"{prefix}hook_mlp_out":
        raise ConfigError(
            f"transcoder {layer} writes {cfg.target_hook_name!r}, not {prefix}hook_mlp_out"
        )
    if cfg.architecture not in ("relu", "jumprelu"):
        raise UnsupportedModelError(
            f"transcoder {layer} is {cfg.architecture}; circuit-tracer sets hold ReLU or JumpReLU"
        )
    return hook


def _layer_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    tensors = {
        "W_enc": sae.W_enc.detach().T,
        "W_dec": sae.W_dec.detach(),
        "b_enc": sae.encoder_bias().detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if sae.cfg.skip_connection:
        tensors["W_skip"] = sae.W_skip.detach()
    if sae.cfg.architecture == "jumprelu":
        tensors[THRESHOLD] = sae.threshold.detach()
    return {name: t.cpu().contiguous() for name, t in tensors.items()}
