"""SAE folders on disk: safetensors weights + ``cfg.json``, in SAELens's layout.

A folder written by ``save_sae`` is also a SAELens (>= 6) folder: the same file
names (``sae_weights.safetensors``, ``cfg.json``), tensor names and config keys,
so ``sae_lens.SAE.load_from_disk`` reads it and computes the same outputs. The
exact ``SAEConfig`` rides along under the ``"mitk"`` key, which SAELens ignores.
``load_sae`` reads those folders and SAELens's own (standard, topk, jumprelu, and
BatchTopK either as its training checkpoint or converted to JumpReLU), refusing
any setting whose computation mitk would not reproduce. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any

from safetensors.torch import load_file, save_file
import torch
from torch import Tensor

from mitk.errors import ConfigError, ShapeMismatchError, UnsupportedModelError
from mitk.sae.autoencoder import SparseAutoencoder
from mitk.sae.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
EXACT_FILE = "mitk_exact.safetensors"
"""JumpReLU only: the learnt ``log_threshold`` bit for bit (``log(exp(t))`` is not exact)."""
MITK_KEY = "mitk"

# SAELens >= 6 reads a cfg without this marker as a pre-6 file and rewrites its keys.
_SAELENS_FORMAT = "6.0.0"
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_FROM_SAELENS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
}
_DTYPES = {"float32", "float64", "float16", "bfloat16"}


# --- saving ---------------------------------------------------------------------------------
def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``sae`` to ``directory`` atomically; the folder loads in mitk and in SAELens.

    JumpReLU writes ``threshold = exp(log_threshold)``; BatchTopK writes its scalar
    inference threshold as a per-latent ``threshold`` (SAELens's own conversion),
    so SAELens sees a JumpReLU SAE that encodes identically. An existing folder is
    replaced whole, and only if it holds nothing but files this function writes.
    """
    target = Path(directory)
    _check_replaceable(target)
    tensors, exact = sae_tensors(sae)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_file(tensors, staging / WEIGHTS_FILE)
        if exact:
            save_file(exact, staging / EXACT_FILE)
        text = json.dumps(saelens_config(sae.cfg), indent=2, sort_keys=True)
        (staging / CONFIG_FILE).write_text(text + "\n")
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def sae_tensors(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """SAELens-named tensors of ``sae``, and the mitk-only ones needed for an exact reload."""
    tensors = {
        name: getattr(sae, name).detach().cpu().contiguous()
        for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    exact: dict[str, Tensor] = {}
    arch = sae.cfg.architecture
    if arch == "jumprelu":
        exact["log_threshold"] = sae.log_threshold.detach().cpu().contiguous()
        tensors["threshold"] = exact["log_threshold"].exp()
    elif arch == "batchtopk":
        theta = sae.batch_threshold.detach().cpu()
        tensors["threshold"] = theta.expand(sae.cfg.d_sae).contiguous()
    return tensors, exact


def saelens_config(cfg: SAEConfig) -> dict[str, Any]:
    """The ``cfg.json`` contents: SAELens's inference keys plus ``cfg`` under ``"mitk"``."""
    metadata: dict[str, Any] = {
        "sae_lens_version": _SAELENS_FORMAT,
        "hook_name": cfg.hook_name or None,
    }
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        # SAELens flattens [.., head, d_head] itself for hook_z SAEs; mitk's d_in is that width
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        "metadata": metadata,
        MITK_KEY: cfg.to_dict(),
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if cfg.architecture == "batchtopk":  # what SAELens records when it converts BatchTopK
        metadata.update(
            training_architecture="batchtopk", training_architecture_details={"k": cfg.k}
        )
    return out


def _check_replaceable(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir():
        ours = {WEIGHTS_FILE, CONFIG_FILE, EXACT_FILE}
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(
                f"{target} holds files save_sae does not write ({', '.join(foreign[:5])}); "
                "the folder is replaced whole, so pick a new or empty one"
            )


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder over ``target``; the old one is moved aside, then deleted."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / target.name)  # a crash from here on leaves the old copy in `old`
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# --- loading --------------------------------------------------------------------------------
def load_sae(directory: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Load an SAE folder written by ``save_sae`` or by SAELens (``save_model``).

    Raises ``FileNotFoundError`` for a missing folder or file, ``UnsupportedModelError``
    for pickle weights, ``ConfigError`` (naming the field) for an architecture or
    setting mitk cannot reproduce exactly, ``ShapeMismatchError`` when a tensor
    disagrees with the config.
    """
    folder = Path(directory)
    raw, tensors = _read_folder(folder)
    if MITK_KEY in raw:
        cfg = _mitk_config(raw)
        state = _mitk_state(cfg, tensors, folder)
    else:
        cfg, state = saelens_to_mitk(raw, tensors)
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
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object")
    return raw, load_file(weights)


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
    state = {
        name: _take(tensors, name).to(to_dtype) for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    if cfg.architecture == "jumprelu":
        threshold = _saelens_threshold(tensors, cfg.d_sae).to(to_dtype)
        exact_file = folder / EXACT_FILE
        if exact_file.is_file():
            log_threshold = _take(load_file(exact_file), "log_threshold").to(to_dtype)
            _check_same_threshold(log_threshold.exp(), threshold)
            state["log_threshold"] = log_threshold
        else:
            state["log_threshold"] = _log_threshold(threshold)
    elif cfg.architecture == "batchtopk":
        threshold = _saelens_threshold(tensors, cfg.d_sae).to(to_dtype)
        state["batch_threshold"] = _scalar_threshold(threshold)
    _refuse_leftovers(tensors)
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


# --- SAELens folders ------------------------------------------------------------------------
def saelens_to_mitk(
    raw: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[SAEConfig, dict[str, Tensor]]:
    """Translate a SAELens ``cfg.json`` dict and its tensors into mitk's config and state.

    Reads SAELens 6 configs (training checkpoints included) and older ones
    (``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs``). TopK SAEs
    trained with ``rescale_acts_by_decoder_norm`` have the decoder norms folded
    into the encoder, which leaves every latent and output unchanged. ``tensors``
    is consumed.
    """
    meta = raw.get("metadata") or {}

    def field(key: str, default: Any = None) -> Any:  # 6.x keeps some keys in metadata
        return raw.get(key, meta.get(key, default))

    arch_name = _saelens_architecture(raw, field)
    _refuse_unsupported(field, tensors)
    dtype = str(field("dtype", "float32")).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ConfigError(f"{CONFIG_FILE} lacks {key!r}")
    to_dtype = getattr(torch, dtype)
    state = {
        name: _take(tensors, name).to(to_dtype) for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    arch = _FROM_SAELENS[arch_name]
    k = field("k", (field("activation_fn_kwargs") or {}).get("k"))
    if arch == "jumprelu":
        threshold = _saelens_threshold(tensors, raw["d_sae"]).to(to_dtype)
        batch_k = (meta.get("training_architecture_details") or {}).get("k")
        from_batchtopk = meta.get("training_architecture") == "batchtopk" and _is_whole(batch_k)
        if from_batchtopk and _is_uniform(threshold):  # SAELens's conversion of BatchTopK
            arch, k = "batchtopk", batch_k
            # mitk gates pre by pre > t with no ReLU: a t < 0 would pass what SAELens zeroes
            state["batch_threshold"] = _scalar_threshold(threshold).clamp_min(0)
        else:
            state["log_threshold"] = _log_threshold(threshold)
    elif arch == "batchtopk":  # a BatchTopK training checkpoint
        theta = _take(tensors, "topk_threshold").to(to_dtype)
        state["batch_threshold"] = _scalar_threshold(theta).clamp_min(0)
    # SAELens trains TopK-family SAEs with this on by default; its inference cfg defaults off
    if arch_name in ("topk", "batchtopk") and field(
        "rescale_acts_by_decoder_norm", arch_name == "batchtopk"
    ):
        _fold_decoder_norms(state)
    tensors.pop("scaling_factor", None)  # all ones here: _refuse_unsupported checked it
    _refuse_leftovers(tensors)
    cfg_fields: dict[str, Any] = dict(
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        architecture=arch,
        apply_b_dec_to_input=bool(field("apply_b_dec_to_input", True)),
        hook_name=field("hook_name") or field("hook_point") or "",
        dtype=dtype,
    )
    if arch in ("topk", "batchtopk"):
        cfg_fields["k"] = _integer_k(k)
    return SAEConfig(**cfg_fields), state


def _saelens_architecture(raw: dict[str, Any], field: Any) -> str:
    arch = raw.get("architecture", "standard")
    # before SAELens 6, TopK was a standard SAE with activation_fn "topk"
    activation = field("activation_fn", field("activation_fn_str"))
    if activation == "topk" and arch == "standard":
        arch = "topk"
    elif activation not in (None, "relu", "topk"):
        raise ConfigError(f"activation_fn={activation!r} is not supported (relu or topk)")
    if arch not in _FROM_SAELENS:
        raise ConfigError(
            f"SAELens architecture {arch!r} is not supported; mitk loads "
            f"{', '.join(sorted(_FROM_SAELENS))}"
        )
    return str(arch)


def _refuse_unsupported(field: Any, tensors: dict[str, Tensor]) -> None:
    """Refuse the SAELens settings that would make mitk compute something else."""
    norm = field("normalize_activations", "none")
    if norm not in ("none", False, None):
        raise ConfigError(
            f"normalize_activations={norm!r}: this SAE rescales or whitens its input with "
            "statistics mitk does not apply; fold them into the weights first (SAELens: "
            "fold_activation_norm_scaling_factor / fold_activation_whitening), then save"
        )
    reshape = field("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise ConfigError(f"reshape_activations={reshape!r} is not supported")
    head = field("hook_head_index", field("hook_point_head_index"))
    if head is not None:
        raise ConfigError(
            f"hook_head_index={head!r}: this SAE reads one head of its hook, which mitk's "
            "SAEConfig cannot express"
        )
    scale = tensors.get("scaling_factor")  # older SAELens saved all ones when unused
    scaled = scale is not None and not bool((scale == 1).all())
    if scaled or (field("finetuning_scaling_factor") and scale is None):
        raise ConfigError(
            "finetuning_scaling_factor: this SAE rescales its latents before decoding, "
            "which mitk does not reproduce"
        )


def _fold_decoder_norms(state: dict[str, Tensor]) -> None:
    """Rescale latents so decoder rows have unit norm; the SAE's outputs stay the same."""
    dtype = state["W_dec"].dtype
    norms = state["W_dec"].double().norm(dim=-1).clamp_min(1e-8)
    state["W_dec"] = (state["W_dec"].double() / norms[:, None]).to(dtype)
    state["W_enc"] = (state["W_enc"].double() * norms).to(dtype)
    state["b_enc"] = (state["b_enc"].double() * norms).to(dtype)


# --- small checks ---------------------------------------------------------------------------
def _take(tensors: dict[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise ConfigError(f"{WEIGHTS_FILE} lacks the tensor {name!r} (has {sorted(tensors)})")
    return tensors.pop(name)


def _refuse_leftovers(tensors: dict[str, Tensor]) -> None:
    if tensors:
        raise ConfigError(
            f"{WEIGHTS_FILE} holds tensors this architecture does not use: {sorted(tensors)}"
        )


def _log_threshold(threshold: Tensor) -> Tensor:
    # SAELens gates ReLU(pre) by pre > t, so a negative t acts as t = 0 (log 0 = -inf, exp -> 0)
    return threshold.clamp_min(0).log()


def _saelens_threshold(tensors: dict[str, Tensor], d_sae: int) -> Tensor:
    if "threshold" not in tensors and "log_threshold" in tensors:  # older training checkpoints
        threshold = tensors.pop("log_threshold").exp()
    else:
        threshold = _take(tensors, "threshold")
    if tuple(threshold.shape) != (d_sae,):
        raise ShapeMismatchError(
            f"threshold has shape {tuple(threshold.shape)}, but d_sae={d_sae} needs ({d_sae},)"
        )
    return threshold


def _is_whole(k: Any) -> bool:
    return isinstance(k, (int, float)) and not isinstance(k, bool) and k == int(k) and k > 0


def _is_uniform(threshold: Tensor) -> bool:
    return threshold.numel() > 0 and bool((threshold == threshold.flatten()[0]).all())


def _scalar_threshold(threshold: Tensor) -> Tensor:
    """One inference threshold from a per-latent vector that repeats it (or a scalar)."""
    flat = threshold.flatten()
    if flat.numel() == 0 or not (_is_uniform(flat) or bool(flat.isnan().all())):
        raise ConfigError("a BatchTopK SAE needs one threshold shared by every latent")
    return flat[0].clone()


def _integer_k(k: Any) -> int:
    if not _is_whole(k):
        raise ConfigError(f"k must be a whole number of latents, got {k!r}")
    return int(k)


def _check_shapes(cfg: SAEConfig, state: dict[str, Tensor]) -> None:
    expected: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
        "log_threshold": (cfg.d_sae,),
        "batch_threshold": (),
    }
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ShapeMismatchError(
                f"{name} has shape {tuple(tensor.shape)}, but d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae} need {expected[name]}"
            )
