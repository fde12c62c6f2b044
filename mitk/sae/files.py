"""SAE folders on disk: safetensors weights + ``cfg.json``, in SAELens's layout.

A folder written by ``save_sae`` is also a SAELens (>= 6) folder: the same file
names (``sae_weights.safetensors``, ``cfg.json``), tensor names and config keys,
so ``sae_lens.SAE.load_from_disk`` reads it and computes the same outputs. The
exact ``SAEConfig`` rides along under the ``"mitk"`` key, which SAELens ignores.
``load_sae`` reads those folders and SAELens's own, refusing any setting whose
computation mitk would not reproduce (the translation is in
``mitk.sae.saelens_format``). Nothing is unpickled; writes are atomic.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
import torch
from torch import Tensor

from mitk.atomic import atomic_folder, complete_folder
from mitk.config import json_object
from mitk.errors import ConfigError, ShapeMismatchError, UnsupportedModelError
from mitk.model.pretrained.files import read_safetensors
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig
from mitk.sae.saelens_format import (
    CONFIG_FILE,
    MITK_KEY,
    WEIGHTS_FILE,
    refuse_leftovers,
    saelens_config,
    saelens_threshold,
    saelens_to_mitk,
    scalar_threshold,
    take,
    to_log_threshold,
)

EXACT_FILE = "mitk_exact.safetensors"
"""JumpReLU only: the learnt ``log_threshold`` bit for bit (``log(exp(t))`` is not exact)."""


# --- saving ---------------------------------------------------------------------------------
def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``sae`` to ``directory`` atomically; the folder loads in mitk and in SAELens.

    JumpReLU writes ``threshold = exp(log_threshold)``; the BatchTopK family
    (Matryoshka included) writes its scalar inference threshold as a per-latent
    ``threshold`` (SAELens's own conversion), so SAELens sees a JumpReLU SAE that
    encodes identically. Gated SAEs and transcoders keep SAELens's tensor names. An
    existing folder is replaced whole, and only if it holds nothing but files this
    function writes.
    """
    target = Path(directory)
    _check_replaceable(target)
    tensors, exact = sae_tensors(sae)
    with atomic_folder(target) as staging:
        save_file(tensors, staging / WEIGHTS_FILE)
        if exact:
            save_file(exact, staging / EXACT_FILE)
        text = json.dumps(saelens_config(sae.cfg), indent=2, sort_keys=True)
        (staging / CONFIG_FILE).write_text(text + "\n")
    return target


def sae_tensors(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """SAELens-named tensors of ``sae``, and the mitk-only ones needed for an exact reload."""
    tensors = {
        name: getattr(sae, name).detach().cpu().contiguous() for name in _weight_names(sae.cfg)
    }
    exact: dict[str, Tensor] = {}
    arch = sae.cfg.architecture
    if arch == "jumprelu":
        exact["log_threshold"] = sae.log_threshold.detach().cpu().contiguous()
        tensors["threshold"] = exact["log_threshold"].exp()
    elif sae.cfg.batch_level_k:
        theta = sae.batch_threshold.detach().cpu()
        tensors["threshold"] = theta.expand(sae.cfg.d_sae).contiguous()
    return tensors, exact


def _weight_names(cfg: SAEConfig) -> tuple[str, ...]:
    """The parameters every architecture saves under SAELens's names (thresholds aside)."""
    biases = ("b_gate", "b_mag", "r_mag") if cfg.architecture == "gated" else ("b_enc",)
    return ("W_enc", "W_dec", *biases, "b_dec", *(("W_skip",) if cfg.skip_connection else ()))


def _check_replaceable(target: Path) -> None:
    if target.is_dir():  # (a file in the way is refused by atomic_folder)
        ours = {WEIGHTS_FILE, CONFIG_FILE, EXACT_FILE}
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(
                f"{target} holds files save_sae does not write ({', '.join(foreign[:5])}); "
                "the folder is replaced whole, so pick a new or empty one"
            )


# --- loading --------------------------------------------------------------------------------
def load_sae(
    directory: str | Path,
    device: str | torch.device | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> SparseAutoencoder:
    """Load an SAE folder written by ``save_sae`` or by SAELens (``save_model``).

    ``overrides`` replace top-level ``cfg.json`` keys before it is read, as SAELens
    applies a pretrained release's ``config_overrides``.

    Raises ``FileNotFoundError`` for a missing folder or file, ``UnsupportedModelError``
    for pickle weights, ``ConfigError`` (naming the field) for an architecture or
    setting mitk cannot reproduce exactly, ``ShapeMismatchError`` when a tensor
    disagrees with the config.
    """
    # a save_sae killed mid-swap leaves the old folder aside: load that one
    folder = complete_folder(directory) or Path(directory)
    raw, tensors = _read_folder(folder)
    raw.update(overrides or {})
    try:
        if MITK_KEY in raw:
            cfg = _mitk_config(raw)
            state = _mitk_state(cfg, tensors, folder)
        else:
            cfg, state = saelens_to_mitk(raw, tensors)
    except ConfigError as err:
        if str(folder) in str(err):
            raise
        raise ConfigError(f"{folder / CONFIG_FILE}: {err}") from err  # say which file
    _check_shapes(cfg, state)
    with torch.device("meta"):  # skip the random initialisation the weights overwrite
        sae = SparseAutoencoder(cfg)
    sae.load_state_dict(state, assign=True)
    return sae.to(device or "cpu")


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no SAE folder at {folder}")
    weights, cfg_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".bin", ".pth"))
        if pickles:
            raise UnsupportedModelError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); mitk reads "
                f"safetensors only because unpickling can execute code. Convert to {WEIGHTS_FILE} "
                "with safetensors.torch.save_file in a trusted environment."
            )
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}")
    # (pretrained SAEs are hub-cache links into blobs, so no containment check here)
    try:
        text = cfg_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{cfg_file} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    return json_object(text, str(cfg_file)), read_safetensors(weights)


def _mitk_config(raw: dict[str, Any]) -> SAEConfig:
    """The exact config, after checking the SAELens-facing keys still describe it."""
    section = raw[MITK_KEY]
    if not isinstance(section, dict):
        raise ConfigError(f"{CONFIG_FILE}: {MITK_KEY!r} must be an object")
    cfg = SAEConfig.from_dict(section)
    header = saelens_config(cfg)
    for key in ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k"):
        if key in header and key in raw and raw[key] != header[key]:
            raise ConfigError(
                f"{CONFIG_FILE}: {key}={raw[key]!r} disagrees with its {MITK_KEY!r} section "
                f"({header[key]!r}); the file was edited by hand or by another tool"
            )
    return cfg


def _mitk_state(cfg: SAEConfig, tensors: dict[str, Tensor], folder: Path) -> dict[str, Tensor]:
    to_dtype = getattr(torch, cfg.dtype)
    state = {name: take(tensors, name).to(to_dtype) for name in _weight_names(cfg)}
    if cfg.architecture == "jumprelu":
        threshold = saelens_threshold(tensors, cfg.d_sae).to(to_dtype)
        exact_file = folder / EXACT_FILE
        if exact_file.is_file():
            log_threshold = take(read_safetensors(exact_file), "log_threshold").to(to_dtype)
            _check_same_threshold(log_threshold.exp(), threshold)
            state["log_threshold"] = log_threshold
        else:
            state["log_threshold"] = to_log_threshold(threshold)
    elif cfg.batch_level_k:
        threshold = saelens_threshold(tensors, cfg.d_sae).to(to_dtype)
        state["batch_threshold"] = scalar_threshold(threshold)
    refuse_leftovers(tensors)
    return state


def _check_same_threshold(from_exact: Tensor, written: Tensor) -> None:
    tol = 8 * torch.finfo(written.dtype).eps
    if from_exact.shape != written.shape or not torch.allclose(
        from_exact, written, rtol=tol, atol=0.0, equal_nan=True
    ):
        raise ConfigError(
            f"{EXACT_FILE} and {WEIGHTS_FILE} hold different JumpReLU thresholds; "
            f"delete {EXACT_FILE} to load the thresholds in {WEIGHTS_FILE}"
        )


def _check_shapes(cfg: SAEConfig, state: dict[str, Tensor]) -> None:
    expected: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_enc": (cfg.d_sae,),
        "b_gate": (cfg.d_sae,),
        "b_mag": (cfg.d_sae,),
        "r_mag": (cfg.d_sae,),
        "b_dec": (cfg.d_out,),
        "W_skip": (cfg.d_out, cfg.d_in),
        "log_threshold": (cfg.d_sae,),
        "batch_threshold": (),
    }
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            out = f", d_out={cfg.d_out}" if cfg.is_transcoder else ""
            raise ShapeMismatchError(
                f"{name} has shape {tuple(tensor.shape)}, but d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}{out} need {expected[name]}"
            )
