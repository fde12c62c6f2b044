"""Cross-layer transcoders on disk: circuit-tracer's CLT folder, which mitk also writes.

The folder (circuit-tracer 0.5.0's ``CrossLayerTranscoder.to_safetensors`` plus
its cache's ``config.yaml``):

- ``W_enc_{L}.safetensors`` for each layer L: ``W_enc_{L} [d_sae, d_model]`` (one
  row per latent, the transpose of mitk's), ``b_enc_{L} [d_sae]``,
  ``b_dec_{L} [d_model]`` (layer L's output bias) and, for JumpReLU,
  ``threshold_{L} [d_sae]``; without thresholds the CLT is ReLU;
- ``W_dec_{L}.safetensors``: ``W_dec_{L} [d_sae, n_layers - L, d_model]``, slot
  ``j`` writing layer ``L + j``;
- ``config.yaml``: ``model_kind: cross_layer_transcoder``,
  ``feature_input_hook`` (``hook_resid_mid`` or ``ln2.hook_normalized``),
  ``feature_output_hook: hook_mlp_out``, optional ``scan`` and ``model_name``;
- ``mitk_clt.json`` (mitk's addition, optional on reading): the whole
  ``CLTConfig``, which keeps what the tensors cannot say (TopK's ``k``, the
  training settings). A TopK CLT is written without ``config.yaml``, since
  circuit-tracer would read it as ReLU.

Files are untrusted: YAML through ``yaml.safe_load``, layers counted from the
files present (0..n-1 without gaps, at most ``MAX_LAYERS``), each file's size
bounded before it is read, every tensor's name, shape and dtype checked against
the others; each refusal names the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Any

from safetensors.torch import save_file
import torch
from torch import Tensor
import yaml

from mitk.atomic import atomic_folder
from mitk.config import TORCH_DTYPES
from mitk.errors import ConfigError, ShapeMismatchError, UnsupportedModelError
from mitk.sae.config import SAEDType
from mitk.sae.crosslayer import CrossLayerTranscoder
from mitk.sae.crosslayer_config import CLT_OUTPUT_HOOK, CLTConfig
from mitk.sae.saelens_format import to_log_threshold
from mitk.sae.transcoder_sets import (
    CONFIG_NAME,
    MAX_FILE_BYTES,
    MAX_LAYERS,
    check_tensor_names,
    check_tensor_shapes,
    read_bounded,
    read_set_config,
)

MITK_CONFIG = "mitk_clt.json"
KIND = "cross_layer_transcoder"
_ENCODER_FILE = "W_enc_{}.safetensors"
_DECODER_FILE = "W_dec_{}.safetensors"
_INPUT_HOOKS = ("hook_resid_mid", "ln2.hook_normalized")


def save_clt(clt: CrossLayerTranscoder, directory: str | Path, *, scan: str | None = None) -> Path:
    """Write ``clt`` to a new folder, atomically, in the format above."""
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} exists; a CLT is written to a new folder")
    cfg = clt.cfg
    with atomic_folder(target) as staging:
        for layer in range(cfg.n_layers):
            encoder = {
                f"W_enc_{layer}": clt.W_enc[layer].T,
                f"b_enc_{layer}": clt.b_enc[layer],
                f"b_dec_{layer}": clt.b_dec[layer],
            }
            if cfg.activation == "jumprelu":
                encoder[f"threshold_{layer}"] = clt.threshold[layer]
            save_file(_plain(encoder), staging / _ENCODER_FILE.format(layer))
            save_file(
                _plain({f"W_dec_{layer}": clt.W_dec[layer]}), staging / _DECODER_FILE.format(layer)
            )
        (staging / MITK_CONFIG).write_text(cfg.to_json(), encoding="utf-8")
        if cfg.activation != "topk":
            config = {
                "model_kind": KIND,
                "feature_input_hook": cfg.input_hook,
                "feature_output_hook": CLT_OUTPUT_HOOK,
                "scan": scan if scan is not None else target.name,
            }
            (staging / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def load_clt(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: SAEDType | None = None,
    input_hook: str | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> CrossLayerTranscoder:
    """Read a CLT folder (or its ``config.yaml``) written by ``save_clt`` or circuit-tracer.

    Without ``mitk_clt.json`` the activation is JumpReLU when thresholds are
    present, else ReLU; the input hook comes from ``config.yaml``, else
    ``input_hook``, else ``hook_resid_mid`` (circuit-tracer's default).
    ``dtype`` converts the weights (default: the config's, or float32).
    Raises ``ConfigError``, ``ShapeMismatchError`` or ``UnsupportedModelError``
    naming the file and what is wrong with it.
    """
    folder = Path(path)
    if folder.is_file() and folder.name == CONFIG_NAME:
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no cross-layer transcoder folder there")
    saved = _mitk_config(folder)
    hook = _input_hook(folder, saved, input_hook)
    n_layers = _count_layers(folder)
    encoder_files = [folder / _ENCODER_FILE.format(layer) for layer in range(n_layers)]
    encoders = [read_bounded(file, max_file_bytes) for file in encoder_files]
    first = encoders[0]
    if "W_enc_0" not in first:
        raise ConfigError(f"{folder / _ENCODER_FILE.format(0)}: no tensor W_enc_0")
    d_sae, d_model = _matrix_shape(first["W_enc_0"], folder / _ENCODER_FILE.format(0))
    jump = "threshold_0" in first
    activation = saved.activation if saved is not None else ("jumprelu" if jump else "relu")
    if (activation == "jumprelu") != jump:
        raise ConfigError(
            f"{folder}: {MITK_CONFIG} says activation {activation!r} but the files "
            f"{'hold' if jump else 'lack'} thresholds"
        )
    to = TORCH_DTYPES[dtype or (saved.dtype if saved is not None else "float32")]
    shape = {"n_layers": n_layers, "d_model": d_model, "d_sae": d_sae, "activation": activation}
    cfg = _config(
        saved, shape, hook, dtype or (saved.dtype if saved is not None else "float32"), folder
    )
    state: dict[str, Tensor] = {}
    W_enc, b_enc, b_dec, thresholds = [], [], [], []
    for layer, tensors in enumerate(encoders):
        file = folder / _ENCODER_FILE.format(layer)
        want = {
            f"W_enc_{layer}": (d_sae, d_model),
            f"b_enc_{layer}": (d_sae,),
            f"b_dec_{layer}": (d_model,),
        }
        if jump:
            want[f"threshold_{layer}"] = (d_sae,)
        _check_layer_tensors(tensors, want, file)
        W_enc.append(tensors[f"W_enc_{layer}"].T)
        b_enc.append(tensors[f"b_enc_{layer}"])
        b_dec.append(tensors[f"b_dec_{layer}"])
        if jump:
            threshold = tensors[f"threshold_{layer}"]
            if bool((threshold < 0).any()):
                # circuit-tracer's JumpReLU is x * (x > t): a negative t passes negative values,
                # which mitk's (ReLU-gated) JumpReLU does not compute
                raise UnsupportedModelError(f"{file}: threshold_{layer} has negative entries")
            thresholds.append(threshold)
        decoder_file = folder / _DECODER_FILE.format(layer)
        decoder = read_bounded(decoder_file, max_file_bytes)
        _check_layer_tensors(
            decoder, {f"W_dec_{layer}": (d_sae, n_layers - layer, d_model)}, decoder_file
        )
        state[f"W_dec.{layer}"] = decoder[f"W_dec_{layer}"]
    state["W_enc"] = torch.stack(W_enc)
    state["b_enc"] = torch.stack(b_enc)
    state["b_dec"] = torch.stack(b_dec)
    if jump:
        state["log_threshold"] = to_log_threshold(torch.stack(thresholds).to(to))
    clt = CrossLayerTranscoder(cfg)
    clt.load_state_dict({name: t.to(to).contiguous() for name, t in state.items()})
    return clt.to(device) if device is not None else clt


def is_clt_folder(path: str | Path) -> bool:
    """True when ``path`` (a folder or its ``config.yaml``) holds a cross-layer transcoder."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    return (folder / _ENCODER_FILE.format(0)).is_file() or (folder / MITK_CONFIG).is_file()


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def _mitk_config(folder: Path) -> CLTConfig | None:
    file = folder / MITK_CONFIG
    if not file.exists():
        return None
    if file.stat().st_size > 1 << 20:
        raise ConfigError(f"{file}: larger than 1 MiB; not a CLT config")
    try:
        return CLTConfig.from_json(file.read_text(encoding="utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not a valid CLTConfig ({err})") from err


def _input_hook(folder: Path, saved: CLTConfig | None, given: str | None) -> str:
    hooks = set()
    if (folder / CONFIG_NAME).exists():
        raw = read_set_config(folder / CONFIG_NAME)
        where = str(folder / CONFIG_NAME)
        if raw.get("model_kind") != KIND:
            raise ConfigError(
                f"{where}: model_kind must be {KIND!r}, got {raw.get('model_kind')!r}"
            )
        if raw.get("feature_output_hook") not in (CLT_OUTPUT_HOOK, "mlp.hook_out"):
            raise ConfigError(
                f"{where}: feature_output_hook must be 'hook_mlp_out', "
                f"got {raw.get('feature_output_hook')!r}"
            )
        read = raw.get("feature_input_hook")
        if read not in _INPUT_HOOKS:
            raise UnsupportedModelError(
                f"{where}: feature_input_hook {read!r}; "
                f"mitk's CLTs read one of {list(_INPUT_HOOKS)}"
            )
        hooks.add(read)
    if saved is not None:
        hooks.add(saved.input_hook)
    if given is not None:
        if given not in _INPUT_HOOKS:
            raise ConfigError(f"input_hook must be one of {list(_INPUT_HOOKS)}, got {given!r}")
        hooks.add(given)
    if len(hooks) > 1:
        raise ConfigError(
            f"{folder}: the config files and input_hook disagree on the input hook {sorted(hooks)}"
        )
    return hooks.pop() if hooks else "hook_resid_mid"


def _count_layers(folder: Path) -> int:
    numbers = []
    for file in folder.iterdir():
        found = re.fullmatch(r"W_(enc|dec)_(\d+)\.safetensors", file.name)
        if found:
            numbers.append(int(found.group(2)))
    if not numbers:
        raise ConfigError(f"{folder}: no {_ENCODER_FILE.format(0)}; not a CLT folder")
    n_layers = max(numbers) + 1
    if n_layers > MAX_LAYERS:
        raise ConfigError(f"{folder}: {n_layers} layers; at most {MAX_LAYERS} are read")
    missing = [
        name.format(layer)
        for layer in range(n_layers)
        for name in (_ENCODER_FILE, _DECODER_FILE)
        if not (folder / name.format(layer)).is_file()
    ]
    if missing:
        raise ConfigError(
            f"{folder}: layer files must run from 0 without gaps; missing {missing[:5]}"
        )
    return n_layers


def _matrix_shape(tensor: Tensor, file: Path) -> tuple[int, int]:
    if tensor.dim() != 2 or 0 in tensor.shape:
        raise ShapeMismatchError(
            f"{file}: W_enc_0 must be a non-empty matrix, not {tuple(tensor.shape)}"
        )
    return int(tensor.shape[0]), int(tensor.shape[1])


def _check_layer_tensors(
    tensors: dict[str, Tensor], want: dict[str, tuple[int, ...]], file: Path
) -> None:
    check_tensor_names(tensors, set(want), set(), file)
    check_tensor_shapes(tensors, want, file, "the CLT's other files make it")


def _config(
    saved: CLTConfig | None, shape: dict[str, Any], hook: str, dtype: str, folder: Path
) -> CLTConfig:
    if saved is None:
        return CLTConfig(**shape, input_hook=hook, dtype=dtype)  # type: ignore[arg-type]
    for name, value in shape.items():
        if getattr(saved, name) != value:
            raise ConfigError(
                f"{folder}: {MITK_CONFIG} says {name}={getattr(saved, name)!r}, the files {value!r}"
            )
    return saved.replace(dtype=dtype)
