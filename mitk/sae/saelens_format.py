"""SAELens's ``cfg.json`` dialect: mitk's ``SAEConfig`` to SAELens keys and back.

``saelens_config`` writes the keys SAELens (>= 6) reads, with the exact config
under ``MITK_KEY``; ``saelens_to_mitk`` reads SAELens folders (standard, topk,
jumprelu, gated, BatchTopK and Matryoshka BatchTopK either as training
checkpoints or converted to JumpReLU, and the transcoders: ``transcoder``,
``skip_transcoder`` and their JumpReLU forms) and raises ``ConfigError`` for any
setting whose computation mitk would not reproduce. A transcoder of an
architecture SAELens has no transcoder for (TopK, gated) is written under a
name of the same pattern (``topk_transcoder``) that only mitk reads. The folder
layout (file names) is SAELens's, so it is defined here; reading and writing
folders lives in ``mitk.sae.files``, which imports this module (never the other
way round).
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
# the BatchTopK family ships as JumpReLU with one shared threshold, as SAELens converts it
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
               "gated": "gated", "matryoshka_batchtopk": "jumprelu"}  # fmt: skip
_FROM_SAELENS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "gated": "gated",
    "matryoshka_batchtopk": "matryoshka_batchtopk",
}
# SAELens's transcoders: (mitk architecture, skip connection)
_TRANSCODERS = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_ENCODER_BIASES = {"gated": ("b_gate", "b_mag", "r_mag")}
"""Tensors an architecture has in place of ``b_enc``."""
_DTYPES = {"float32", "float64", "float16", "bfloat16"}


# --- mitk to SAELens ------------------------------------------------------------------------
def saelens_config(cfg: SAEConfig) -> dict[str, Any]:
    """The ``cfg.json`` contents: SAELens's inference keys plus ``cfg`` under ``"mitk"``."""
    metadata: dict[str, Any] = {
        "sae_lens_version": _SAELENS_FORMAT,
        "hook_name": cfg.hook_name or None,
    }
    out: dict[str, Any] = {
        "architecture": saelens_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        # a transcoder never subtracts its (output-space) b_dec; SAELens refuses True there
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input and not cfg.is_transcoder,
        "normalize_activations": "none",
        # SAELens flattens [.., head, d_head] itself for hook_z SAEs; mitk's d_in is that width
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        "metadata": metadata,
        MITK_KEY: cfg.to_dict(),
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if cfg.batch_level_k:  # what SAELens records when it converts BatchTopK
        details: dict[str, Any] = {"k": cfg.k}
        if cfg.architecture == "matryoshka_batchtopk":
            details["matryoshka_widths"] = list(cfg.matryoshka_widths)
        metadata.update(
            training_architecture=cfg.architecture, training_architecture_details=details
        )
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
        metadata["hook_name_out"] = cfg.target_hook_name
    return out


def saelens_architecture(cfg: SAEConfig) -> str:
    """SAELens's architecture name for ``cfg`` (``skip_transcoder``, ``jumprelu``, ...)."""
    base = _TO_SAELENS[cfg.architecture]
    if not cfg.is_transcoder:
        return base
    prefix = "" if base == "standard" else f"{base}_"
    return f"{prefix}{'skip_' if cfg.skip_connection else ''}transcoder"


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

    arch_name, skip = _saelens_architecture(raw, field)
    transcoder = arch_name in _TRANSCODERS
    _refuse_unsupported(field, tensors)
    dtype = str(field("dtype", "float32")).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ConfigError(f"{CONFIG_FILE} lacks {key!r}")
    to_dtype = getattr(torch, dtype)
    arch, _ = _TRANSCODERS[arch_name] if transcoder else (_FROM_SAELENS[arch_name], False)
    names = ("W_enc", "W_dec", *_ENCODER_BIASES.get(arch, ("b_enc",)), "b_dec")
    state = {name: take(tensors, name).to(to_dtype) for name in names}
    if skip:
        state["W_skip"] = take(tensors, "W_skip").to(to_dtype)
    k = field("k", (field("activation_fn_kwargs") or {}).get("k"))
    details = meta.get("training_architecture_details") or {}
    widths: Any = ()
    if arch == "jumprelu":
        threshold = saelens_threshold(tensors, raw["d_sae"]).to(to_dtype)
        trained_as = str(meta.get("training_architecture"))
        batch_k = details.get("k")
        from_batchtopk = trained_as in ("batchtopk", "matryoshka_batchtopk") and _is_whole(batch_k)
        if from_batchtopk and _is_uniform(threshold):  # SAELens's conversion of BatchTopK
            arch, k = trained_as, batch_k
            # mitk gates pre by pre > t with no ReLU: a t < 0 would pass what SAELens zeroes
            state["batch_threshold"] = scalar_threshold(threshold).clamp_min(0)
            if arch == "matryoshka_batchtopk":
                widths = details.get("matryoshka_widths") or ()
        else:
            state["log_threshold"] = to_log_threshold(threshold)
    elif arch in ("batchtopk", "matryoshka_batchtopk"):  # a training checkpoint
        theta = take(tensors, "topk_threshold").to(to_dtype)
        state["batch_threshold"] = scalar_threshold(theta).clamp_min(0)
        widths = field("matryoshka_widths") or ()
    # SAELens trains TopK-family SAEs with this on by default; its inference cfg defaults off
    batch_trained = arch_name in ("batchtopk", "matryoshka_batchtopk")
    if arch_name in ("topk", "batchtopk", "matryoshka_batchtopk") and field(
        "rescale_acts_by_decoder_norm", batch_trained
    ):
        _fold_decoder_norms(state)
    tensors.pop("scaling_factor", None)  # all ones here: _refuse_unsupported checked it
    refuse_leftovers(tensors)
    cfg_fields: dict[str, Any] = dict(
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        architecture=arch,
        apply_b_dec_to_input=bool(field("apply_b_dec_to_input", not transcoder)),
        hook_name=field("hook_name") or field("hook_point") or "",
        dtype=dtype,
    )
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        cfg_fields["k"] = _integer_k(k)
    if widths:
        cfg_fields["matryoshka_widths"] = tuple(widths)
    if transcoder:
        cfg_fields.update(_transcoder_fields(field, raw["d_in"], skip))
    return SAEConfig(**cfg_fields), state


def _transcoder_fields(field: Any, d_in: int, skip: bool) -> dict[str, Any]:
    """``target_hook_name``, ``d_out`` and ``skip_connection`` of a SAELens transcoder."""
    target = field("hook_name_out")
    if not target:
        raise ConfigError(
            f"this transcoder's {CONFIG_FILE} does not say which hook it reconstructs "
            "(hook_name_out); pass it, e.g. load_sae(folder, overrides={'hook_name_out': "
            "'blocks.0.hook_mlp_out'})"
        )
    return {"target_hook_name": target, "d_out": field("d_out", d_in), "skip_connection": skip}


def _saelens_architecture(raw: dict[str, Any], field: Any) -> tuple[str, bool]:
    """SAELens's architecture name, and whether it is a skip-transcoder."""
    arch = raw.get("architecture", "standard")
    # before SAELens 6, TopK was a standard SAE with activation_fn "topk"
    activation = field("activation_fn", field("activation_fn_str"))
    if activation == "topk" and arch == "standard":
        arch = "topk"
    elif activation not in (None, "relu", "topk"):
        raise ConfigError(f"activation_fn={activation!r} is not supported (relu or topk)")
    if arch not in _FROM_SAELENS and arch not in _TRANSCODERS:
        raise ConfigError(
            f"SAELens architecture {arch!r} is not supported; mitk loads "
            f"{', '.join(sorted([*_FROM_SAELENS, *_TRANSCODERS]))}"
        )
    return str(arch), arch in _TRANSCODERS and _TRANSCODERS[arch][1]


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
