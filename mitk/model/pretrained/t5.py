"""Hugging Face T5 (``model_type="t5"``) checkpoints to ``HookedEncoderDecoder`` weights.

Covers T5 v1.0 (relu MLP, unembedding tied to the embedding and the decoder
output rescaled by ``d_model**-0.5``) and v1.1 / Flan-T5 (``gated-gelu``,
untied ``lm_head``, no rescale). The rescale follows ``scale_decoder_outputs``
when the config has it (transformers 5 writes it), else ``tie_word_embeddings``.
A checkpoint's own ``lm_head.weight`` is used when present, else the embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mitk.config import json_object, loading_overrides
from mitk.errors import ConfigError, UnsupportedModelError
from mitk.model.encoder_decoder_config import EncoderDecoderConfig
from mitk.model.memory import ensure_parameters_fit
from mitk.model.pretrained import mappings
from mitk.model.pretrained.files import read_safetensors_dir

# HF activation name -> mitk act_fn ("gelu" is exact GELU, "gelu_new" the tanh approximation)
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "silu": "silu"}


def t5_config(hf: dict[str, Any], **overrides: Any) -> EncoderDecoderConfig:
    """EncoderDecoderConfig equivalent to a T5 ``config.json``."""
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    # HF maps "gated-gelu" to gelu_new (tanh) for backwards compatibility
    act_fn = "gelu_tanh" if proj == "gated-gelu" else _ACTIVATIONS.get(act)
    if act_fn is None:
        raise UnsupportedModelError(f"T5 feed_forward_proj {proj!r} is not supported")
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    fields: dict[str, Any] = {
        "d_model": hf["d_model"],
        "n_layers": hf["num_layers"],
        "n_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
        "n_heads": hf["num_heads"],
        "d_head": hf["d_kv"],
        "d_mlp": hf["d_ff"],
        "d_vocab": hf["vocab_size"],
        "act_fn": act_fn,
        "gated_mlp": gated,
        "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
        "relative_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf.get("relative_attention_max_distance", 128),
        "scale_unembed_input": bool(scale),
        "architecture": "t5",
        "extra": {"source_model_type": "t5"},
    }
    fields.update(overrides)
    return EncoderDecoderConfig(**fields)


def t5_state_dict(hf_state: dict[str, Tensor], cfg: EncoderDecoderConfig) -> dict[str, Tensor]:
    """Rename and transpose a ``T5ForConditionalGeneration`` state dict to mitk names."""
    sd = hf_state
    token = next((t for t in ("shared", "encoder.embed_tokens") if f"{t}.weight" in sd), None)
    if token is None:
        raise UnsupportedModelError("T5 checkpoint has no shared.weight embedding")
    out = mappings.embeddings(sd, token)
    stacks = (("encoder", cfg.n_layers, False), ("decoder", cfg.n_decoder_layers, True))
    for stack, n_layers, is_decoder in stacks:
        out |= mappings.norm(sd, f"{stack}.final_layer_norm", f"{stack}.ln_final", bias=False)
        for layer in range(n_layers):
            hf, mk = f"{stack}.block.{layer}.layer", f"{stack}.{layer}"
            out |= _attention(sd, f"{hf}.0.SelfAttention", f"{mk}.attn")
            out |= mappings.norm(sd, f"{hf}.0.layer_norm", f"{mk}.ln1", bias=False)
            if layer == 0:
                out[f"{mk}.rel_pos.W_rel"] = sd[
                    f"{hf}.0.SelfAttention.relative_attention_bias.weight"
                ]
            ff = f"{hf}.{2 if is_decoder else 1}"
            if is_decoder:
                out |= _attention(sd, f"{hf}.1.EncDecAttention", f"{mk}.cross_attn")
                out |= mappings.norm(sd, f"{hf}.1.layer_norm", f"{mk}.ln_cross", bias=False)
            out |= mappings.norm(sd, f"{ff}.layer_norm", f"{mk}.ln2", bias=False)
            dense = f"{ff}.DenseReluDense"
            # gated: wi_0 is the gate, wi_1 the linear input
            w_in, gate = (
                (f"{dense}.wi_1", f"{dense}.wi_0") if cfg.gated_mlp else (f"{dense}.wi", None)
            )
            out |= mappings.mlp(sd, w_in, f"{dense}.wo", f"{mk}.mlp", gate=gate, bias=False)
    return out


def _attention(sd: dict[str, Tensor], hf: str, mk: str) -> dict[str, Tensor]:
    """T5 attention: separate, unbiased q, k, v, o projections (mitk's ``W_q_packed``...)."""
    out = mappings.attn_out(sd, f"{hf}.o", mk, bias=False)
    for p in "qkv":
        out |= mappings.linear(sd, f"{hf}.{p}", f"{mk}.W_{p}_packed")
    return out


def t5_parameter_count(cfg: EncoderDecoderConfig) -> int:
    """Parameters of ``HookedEncoderDecoder(cfg)``, counted from the config alone.

    Per encoder layer: q/k/v/o (``4 d_model n_heads d_head``), the MLP (2 or 3
    ``d_model x d_mlp`` matrices) and two norms; decoder layers add cross-attention
    and a third norm. Plus the embedding, the untied unembedding, one relative
    position bias table per stack and the two final norms.
    """
    d, inner = cfg.d_model, cfg.n_heads * cfg.d_head
    mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
    encoder = cfg.n_layers * (4 * d * inner + mlp + 2 * d)
    decoder = cfg.n_decoder_layers * (8 * d * inner + mlp + 3 * d)
    tables = 2 * cfg.relative_buckets * cfg.n_heads
    return 2 * cfg.d_vocab * d + encoder + decoder + tables + 2 * d


def load_t5(
    model_cls: Any,
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attention_backend: str | None = None,
) -> Any:
    """Build ``model_cls`` (``HookedEncoderDecoder``) from a T5 directory or in-memory model."""
    overrides = loading_overrides(dtype, attention_backend)
    if isinstance(source, nn.Module):
        hf_config: dict[str, Any] = source.config.to_dict()  # type: ignore[union-attr,operator]
        state = dict(source.state_dict())
    else:
        directory = Path(source)
        config_file = directory / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{directory} holds no config.json")
        hf_config = json_object(config_file.read_text(errors="replace"), str(config_file))
    if hf_config.get("model_type") != "t5":
        raise UnsupportedModelError(
            f"HookedEncoderDecoder loads model_type 't5', got {hf_config.get('model_type')!r}"
        )
    try:
        cfg = t5_config(hf_config, **overrides)
    except KeyError as err:
        raise ConfigError(f"T5 config lacks field {err}") from err
    # estimated from the config before any weight is read or any block is built
    where = "the in-memory T5" if isinstance(source, nn.Module) else str(source)
    ensure_parameters_fit(t5_parameter_count(cfg), cfg.dtype, what=where)
    if not isinstance(source, nn.Module):
        state = read_safetensors_dir(Path(source))
    model = model_cls(cfg, seed=None)
    model.load_state_dict(t5_state_dict(state, cfg), strict=True)
    model.eval()
    return model.to(device) if device is not None else model
