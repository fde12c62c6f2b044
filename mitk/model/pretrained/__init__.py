"""Loading and saving checkpoints: Hugging Face directories and models, and mitk's own format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mitk.atomic import atomic_write_text
from mitk.config import TransformerConfig, loading_overrides
from mitk.errors import ConfigError, MitkError, ModelFileError, UnsupportedModelError
from mitk.model.memory import ensure_fits
from mitk.model.pretrained.bamba import bamba_config, bamba_state_dict
from mitk.model.pretrained.bert import bert_config, bert_state_dict
from mitk.model.pretrained.big_bird import big_bird_config, big_bird_state_dict
from mitk.model.pretrained.bloom import bloom_config, bloom_state_dict
from mitk.model.pretrained.checks import (
    check_hf_fields,
    check_state_shapes,
    checked_conversion,
)
from mitk.model.pretrained.cohere import cohere_config, cohere_state_dict
from mitk.model.pretrained.deepseek import deepseek_config, deepseek_state_dict
from mitk.model.pretrained.embedded import embedded_models
from mitk.model.pretrained.files import (
    atomic_save_safetensors,
    check_tokenizer_files,
    has_tokenizer,
    read_json_file,
    read_safetensors_dir,
    weight_files,
)
from mitk.model.pretrained.gemma import gemma_config, gemma_state_dict
from mitk.model.pretrained.gemma3 import gemma3_config, gemma3_state_dict
from mitk.model.pretrained.gpt2 import gpt2_config, gpt2_state_dict
from mitk.model.pretrained.gpt_neo import gpt_neo_config, gpt_neo_state_dict
from mitk.model.pretrained.gpt_oss import gpt_oss_config, gpt_oss_state_dict
from mitk.model.pretrained.gptj import gptj_config, gptj_state_dict
from mitk.model.pretrained.granite import granite_config, granite_state_dict
from mitk.model.pretrained.hub import looks_like_repo_id, resolve_repo
from mitk.model.pretrained.legacy import upgrade_native_state
from mitk.model.pretrained.llama import llama_config, llama_state_dict
from mitk.model.pretrained.longformer import longformer_config, longformer_state_dict
from mitk.model.pretrained.mamba import (
    mamba2_config,
    mamba2_state_dict,
    mamba_config,
    mamba_state_dict,
)
from mitk.model.pretrained.mixtral import mixtral_config, mixtral_state_dict
from mitk.model.pretrained.neox import neox_config, neox_state_dict
from mitk.model.pretrained.nystromformer import (
    nystromformer_config,
    nystromformer_state_dict,
)
from mitk.model.pretrained.olmo2 import olmo2_config, olmo2_state_dict
from mitk.model.pretrained.olmoe import olmoe_config, olmoe_state_dict
from mitk.model.pretrained.phi3 import phi3_config, phi3_state_dict
from mitk.model.pretrained.qwen3 import qwen3_config, qwen3_state_dict
from mitk.model.pretrained.qwen_moe import qwen_moe_config, qwen_moe_state_dict
from mitk.model.pretrained.rwkv import rwkv_config, rwkv_state_dict
from mitk.model.pretrained.smollm3 import smollm3_config, smollm3_state_dict
from mitk.model.pretrained.stablelm import stablelm_config, stablelm_state_dict
from mitk.model.pretrained.starcoder2 import starcoder2_config, starcoder2_state_dict

NATIVE_CONFIG = "mitk_config.json"
NATIVE_WEIGHTS = "model.safetensors"

ConfigFn = Callable[..., TransformerConfig]
StateFn = Callable[[dict[str, Tensor], TransformerConfig], dict[str, Tensor]]
# Hugging Face ``model_type`` -> (config converter, state-dict converter)
CONVERTERS: dict[str, tuple[ConfigFn, StateFn]] = {
    "bamba": (bamba_config, bamba_state_dict),
    "bert": (bert_config, bert_state_dict),
    "big_bird": (big_bird_config, big_bird_state_dict),
    "bloom": (bloom_config, bloom_state_dict),
    "cohere": (cohere_config, cohere_state_dict),
    "deepseek_v2": (deepseek_config, deepseek_state_dict),
    "gemma": (gemma_config, gemma_state_dict),
    "gemma2": (gemma_config, gemma_state_dict),
    "gemma3_text": (gemma3_config, gemma3_state_dict),
    "gpt2": (gpt2_config, gpt2_state_dict),
    "gpt_neo": (gpt_neo_config, gpt_neo_state_dict),
    "gpt_neox": (neox_config, neox_state_dict),
    "gpt_oss": (gpt_oss_config, gpt_oss_state_dict),
    "gptj": (gptj_config, gptj_state_dict),
    "granite": (granite_config, granite_state_dict),
    "llama": (llama_config, llama_state_dict),
    "longformer": (longformer_config, longformer_state_dict),
    "mamba": (mamba_config, mamba_state_dict),
    "mamba2": (mamba2_config, mamba2_state_dict),
    "mistral": (llama_config, llama_state_dict),
    "mixtral": (mixtral_config, mixtral_state_dict),
    "nystromformer": (nystromformer_config, nystromformer_state_dict),
    "olmo2": (olmo2_config, olmo2_state_dict),
    "olmoe": (olmoe_config, olmoe_state_dict),
    "phi3": (phi3_config, phi3_state_dict),
    "qwen2": (llama_config, llama_state_dict),
    "qwen2_moe": (qwen_moe_config, qwen_moe_state_dict),
    "qwen3": (qwen3_config, qwen3_state_dict),
    "qwen3_moe": (qwen_moe_config, qwen_moe_state_dict),
    "rwkv": (rwkv_config, rwkv_state_dict),
    "smollm3": (smollm3_config, smollm3_state_dict),
    "stablelm": (stablelm_config, stablelm_state_dict),
    "starcoder2": (starcoder2_config, starcoder2_state_dict),
}


def supported_architectures() -> list[str]:
    """Hugging Face ``model_type`` values mitk can convert."""
    return sorted(CONVERTERS)


def hf_converters(hf_config: dict[str, Any]) -> tuple[ConfigFn, StateFn]:
    """The converters for a Hugging Face config, or an error listing what is supported."""
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"field 'model_type' must be a string, got {model_type!r}")
    if model_type == "t5":  # encoder-decoder: a different model class, not a decoder-only config
        raise UnsupportedModelError(
            "model_type 't5' is an encoder-decoder; load it with "
            "mitk.HookedEncoderDecoder.from_pretrained(...)"
        )
    if model_type not in CONVERTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return CONVERTERS[model_type]


def load_pretrained(
    model_cls: Any,
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    attention_backend: str | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    revision: str | None = None,
    max_memory_gb: float | None = None,
) -> Any:
    """Build ``model_cls`` from a HF directory, a mitk save directory or an in-memory HF model.

    A string that is neither a directory nor an embedded model name is a Hugging Face
    repo id, resolved through the hub cache at ``revision`` (see ``hub.resolve_repo``).
    The four processing flags, all off by default, are applied after loading
    (see ``HookedTransformer.process_weights``). Before any weight is read, the
    memory the model and its weight files need is estimated from the config and
    compared with ``max_memory_gb`` (else ``MITK_MAX_MEMORY_GB``, else the memory
    available): ``ModelTooLargeError`` if it does not fit. Every file read lies
    inside the directory; bad files raise ``ModelFileError``/``ConfigError`` naming them.
    """
    overrides = loading_overrides(dtype, attention_backend)
    if isinstance(source, nn.Module):
        name = type(source).__name__
        hf_dict: dict[str, Any] = source.config.to_dict()  # type: ignore[union-attr,operator]
        cfg, make_state = hf_config(hf_dict, overrides, f"the config of the in-memory {name}")
        ensure_fits(cfg, max_memory_gb, what=f"the {name}")
        where = f"the weights of the in-memory {name}"
        state = checked_conversion(lambda: make_state(source.state_dict(), cfg), where)
    else:
        directory = _locate(source, revision)
        cfg, convert_state = _directory_config(directory, overrides)
        weight_bytes = sum(f.stat().st_size for f in weight_files(directory) if f.is_file())
        ensure_fits(cfg, max_memory_gb, extra_bytes=weight_bytes, what=str(directory))
        state = checked_conversion(
            lambda: convert_state(read_safetensors_dir(directory)), f"the weights in {directory}"
        )
        if tokenizer is None and has_tokenizer(directory):
            tokenizer = _load_tokenizer(directory)
        where = f"the weights in {directory}"
    model = model_cls(cfg, tokenizer=tokenizer, seed=None)
    check_state_shapes(model.state_dict(), state, where)
    model.load_state_dict(state, strict=True)
    model.eval()  # like Hugging Face: loaded models are for inference unless told otherwise
    model = model.to(device) if device is not None else model
    return model.process_weights(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )


def _directory_config(
    directory: Path, overrides: dict[str, Any]
) -> tuple[TransformerConfig, Callable[[dict[str, Tensor]], dict[str, Tensor]]]:
    """The config in ``directory`` (mitk's own or Hugging Face's) and its state conversion."""
    if (directory / NATIVE_CONFIG).exists():
        path = directory / NATIVE_CONFIG
        data = read_json_file(directory, NATIVE_CONFIG)
        try:
            cfg = TransformerConfig.from_dict({**data, **overrides})
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        except (TypeError, ValueError, KeyError, AttributeError) as err:  # a check's blind spot
            raise ConfigError(f"{path}: invalid config ({type(err).__name__}: {err})") from err
        return cfg, upgrade_native_state
    if (directory / "config.json").exists():
        hf = read_json_file(directory, "config.json")
        cfg, make_state = hf_config(hf, overrides, str(directory / "config.json"))
        return cfg, lambda weights: make_state(weights, cfg)
    raise FileNotFoundError(f"{directory} has neither {NATIVE_CONFIG} nor config.json")


def hf_config(
    hf: dict[str, Any], overrides: dict[str, Any], where: str
) -> tuple[TransformerConfig, StateFn]:
    """Convert a Hugging Face config dict, every failure a ``MitkError`` naming ``where``.

    Field types and ranges are checked first (``hf_fields``), so a ``"64"`` or a list
    where a size belongs is reported by field name rather than as a ``TypeError``.
    """
    try:
        make_config, make_state = hf_converters(hf)
        check_hf_fields(hf)
        cfg = make_config(hf, **overrides)
    except KeyError as err:
        raise ConfigError(f"{where} lacks field {err}") from err
    except (ConfigError, UnsupportedModelError) as err:
        raise type(err)(f"{where}: {err}") from err
    except MitkError:
        raise
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as err:
        raise ConfigError(f"{where}: cannot convert ({type(err).__name__}: {err})") from err
    return cfg, make_state


def _load_tokenizer(directory: Path) -> Any:
    """The Hugging Face tokenizer in ``directory``, its files checked first."""
    check_tokenizer_files(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # transformers/tokenizers raise many types
        raise ModelFileError(
            f"{directory}: its tokenizer files cannot be loaded ({type(err).__name__}: {err})"
        ) from err


def _locate(source: str | Path, revision: str | None = None) -> Path:
    """The directory for a path, an embedded model name or a Hugging Face repo id."""
    directory = Path(source)
    embedded = embedded_models()
    is_repo = isinstance(source, str) and source not in embedded and looks_like_repo_id(source)
    if revision is not None and (directory.is_dir() or not is_repo):
        raise ConfigError(f"revision={revision!r} applies to Hugging Face repo ids, not {source!s}")
    if directory.is_dir():
        return directory
    if isinstance(source, str) and source in embedded:
        return embedded[source]
    missing = (
        f"{source!s} is not a directory holding a checkpoint nor an embedded model "
        f"(embedded: {', '.join(embedded) or 'none'})"
    )
    if not is_repo:
        raise FileNotFoundError(missing)
    try:
        return resolve_repo(str(source), revision)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{missing}; as a Hugging Face repo id: {err}") from err


def save_native(model: Any, directory: Path) -> Path:
    """Write ``model`` in mitk's own format; ``load_pretrained`` reads it back exactly."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), directory / NATIVE_WEIGHTS)
    atomic_write_text(directory / NATIVE_CONFIG, model.cfg.to_json())
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return directory
