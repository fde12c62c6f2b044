"""SAELens's ``cfg.json`` dialect: mitk's ``SAEConfig`` to SAELens keys and back.

``saelens_config`` writes the keys SAELens (>= 6) reads, with the exact config
under ``MITK_KEY``; ``saelens_to_mitk`` reads SAELens folders (standard, topk,
jumprelu, and BatchTopK either as its training checkpoint or converted to
JumpReLU) and raises ``ConfigError`` for any setting whose computation mitk would
not reproduce. The folder layout (file names) is SAELens's, so it is defined
here; reading and writing folders lives in ``mitk.sae.files``, which imports this
module (never the other way round).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.errors import ConfigError, ShapeMismatchError
from mitk.sae.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
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


# --- mitk to SAELens ------------------------------------------------------------------------
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


# --- SAELens to mitk ------------------------------------------------------------------------
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
        name: take(tensors, name).to(to_dtype) for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    arch = _FROM_SAELENS[arch_name]
    k = field("k", (field("activation_fn_kwargs") or {}).get("k"))
    if arch == "jumprelu":
        threshold = saelens_threshold(tensors, raw["d_sae"]).to(to_dtype)
        batch_k = (meta.get("training_architecture_details") or {}).get("k")
        from_batchtopk = meta.get("training_architecture") == "batchtopk" and _is_whole(batch_k)
        if from_batchtopk and _is_uniform(threshold):  # SAELens's conversion of BatchTopK
            arch, k = "batchtopk", batch_k
            # mitk gates pre by pre > t with no ReLU: a t < 0 would pass what SAELens zeroes
            state["batch_threshold"] = scalar_threshold(threshold).clamp_min(0)
        else:
            state["log_threshold"] = to_log_threshold(threshold)
    elif arch == "batchtopk":  # a BatchTopK training checkpoint
        theta = take(tensors, "topk_threshold").to(to_dtype)
        state["batch_threshold"] = scalar_threshold(theta).clamp_min(0)
    # SAELens trains TopK-family SAEs with this on by default; its inference cfg defaults off
    if arch_name in ("topk", "batchtopk") and field(
        "rescale_acts_by_decoder_norm", arch_name == "batchtopk"
    ):
        _fold_decoder_norms(state)
    tensors.pop("scaling_factor", None)  # all ones here: _refuse_unsupported checked it
    refuse_leftovers(tensors)
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


# --- tensor checks (shared with mitk.sae.files) ---------------------------------------------
def take(tensors: dict[str, Tensor], name: str) -> Tensor:
    """Pop ``name`` from ``tensors``; ``ConfigError`` naming what is there if it is missing."""
    if name not in tensors:
        raise ConfigError(f"{WEIGHTS_FILE} lacks the tensor {name!r} (has {sorted(tensors)})")
    return tensors.pop(name)


def refuse_leftovers(tensors: dict[str, Tensor]) -> None:
    """``ConfigError`` if any tensor was not taken: a weight mitk would silently ignore."""
    if tensors:
        raise ConfigError(
            f"{WEIGHTS_FILE} holds tensors this architecture does not use: {sorted(tensors)}"
        )


def to_log_threshold(threshold: Tensor) -> Tensor:
    """mitk's JumpReLU ``log_threshold`` from SAELens's ``threshold``."""
    # SAELens gates ReLU(pre) by pre > t, so a negative t acts as t = 0 (log 0 = -inf, exp -> 0)
    return threshold.clamp_min(0).log()


def saelens_threshold(tensors: dict[str, Tensor], d_sae: int) -> Tensor:
    """Pop the per-latent ``threshold`` (or an older checkpoint's ``log_threshold``)."""
    if "threshold" not in tensors and "log_threshold" in tensors:  # older training checkpoints
        threshold = tensors.pop("log_threshold").exp()
    else:
        threshold = take(tensors, "threshold")
    if tuple(threshold.shape) != (d_sae,):
        raise ShapeMismatchError(
            f"threshold has shape {tuple(threshold.shape)}, but d_sae={d_sae} needs ({d_sae},)"
        )
    return threshold


def scalar_threshold(threshold: Tensor) -> Tensor:
    """One inference threshold from a per-latent vector that repeats it (or a scalar)."""
    flat = threshold.flatten()
    if flat.numel() == 0 or not (_is_uniform(flat) or bool(flat.isnan().all())):
        raise ConfigError("a BatchTopK SAE needs one threshold shared by every latent")
    return flat[0].clone()


def _is_whole(k: Any) -> bool:
    return isinstance(k, (int, float)) and not isinstance(k, bool) and k == int(k) and k > 0


def _is_uniform(threshold: Tensor) -> bool:
    return threshold.numel() > 0 and bool((threshold == threshold.flatten()[0]).all())


def _integer_k(k: Any) -> int:
    if not _is_whole(k):
        raise ConfigError(f"k must be a whole number of latents, got {k!r}")
    return int(k)
