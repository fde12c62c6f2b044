"""Loading is contained and bounded: files stay inside the model directory, bad files and
configs raise ``MitkError``s naming the file and the tensor or field, and the memory a
model needs is checked from its config before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest
from safetensors.torch import load_file, save_file
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.config import MoEConfig
from mitk.errors import ConfigError, ModelFileError, ModelTooLargeError
from mitk.model import memory
from mitk.model.pretrained import files
from tests.checkpoints import save_gpt2


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A one-layer random GPT-2 with the word tokenizer, in ``tmp_path/model``."""
    return save_gpt2(tmp_path / "model", n_layer=1)


def _shard(directory: Path, outside: Path) -> None:
    """Split ``directory``'s weights in two shards, the second named ``outside`` in the index."""
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(state)
    save_file({k: state[k] for k in names[:3]}, directory / "a.safetensors")
    save_file({k: state[k] for k in names[3:]}, directory / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in names[:3]} | {k: str(outside) for k in names[3:]}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_inside_the_directory_loads(hf_dir: Path) -> None:
    reference = HookedTransformer.from_pretrained(hf_dir)
    _shard(hf_dir, Path("b.safetensors"))
    loaded = HookedTransformer.from_pretrained(hf_dir)
    tokens = torch.tensor([[1, 5, 7]])
    assert torch.equal(loaded(tokens), reference(tokens))


@pytest.mark.parametrize("entry", ["../outside/b.safetensors", "ABSOLUTE", "sub/../../b"])
def test_shard_index_entry_outside_the_directory_is_refused_by_name(
    hf_dir: Path, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = hf_dir.parent / "outside"
    outside.mkdir()
    entry = str(outside / "b.safetensors") if entry == "ABSOLUTE" else entry
    _shard(hf_dir, Path(entry))
    shutil.copy(hf_dir / "b.safetensors", outside / "b.safetensors")
    opened: list[Path] = []
    monkeypatch.setattr(files, "load_file", lambda p: opened.append(Path(p)) or load_file(p))
    with pytest.raises(ModelFileError, match=r"weight_map\[.*lies outside the model directory"):
        HookedTransformer.from_pretrained(hf_dir)
    assert opened == []


def test_symlink_leading_out_of_the_directory_is_refused(hf_dir: Path) -> None:
    outside = hf_dir.parent / "elsewhere.safetensors"
    (hf_dir / "model.safetensors").rename(outside)
    (hf_dir / "model.safetensors").symlink_to(outside)
    with pytest.raises(ModelFileError, match=r"resolves to .*elsewhere\.safetensors, outside"):
        HookedTransformer.from_pretrained(hf_dir)


def test_hub_snapshot_links_into_its_blobs_are_followed(tmp_path: Path) -> None:
    """The hub stores files in ``blobs/`` and links them from ``snapshots/<rev>/``."""
    snapshot = save_gpt2(tmp_path / "repo" / "snapshots" / "abc", with_tokenizer=False, n_layer=1)
    (tmp_path / "repo" / "blobs").mkdir()
    blob = tmp_path / "repo" / "blobs" / "0123"
    (snapshot / "model.safetensors").rename(blob)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/0123"))
    assert HookedTransformer.from_pretrained(snapshot).cfg.n_layers == 1


def test_tokenizer_config_naming_a_file_outside_is_refused(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["vocab_file"] = "/etc/passwd"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"tokenizer_config.json field 'vocab_file'"):
        HookedTransformer.from_pretrained(hf_dir)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b[:5],  # shorter than the header length
        lambda b: b"",  # empty
        lambda b: b[:8] + b"{not json" + b[17:],  # header bytes garbled
        lambda b: (2**40).to_bytes(8, "little") + b[8:],  # header length beyond the file
    ],
    ids=["half", "five-bytes", "empty", "garbled-header", "huge-header-length"],
)
def test_malformed_safetensors_names_the_file(hf_dir: Path, damage: object) -> None:
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ModelFileError, match=r"model\.safetensors: not a readable safetensors"):
        HookedTransformer.from_pretrained(hf_dir)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_non_json_config_or_tokenizer_names_the_file(
    hf_dir: Path, name: str, content: bytes
) -> None:
    (hf_dir / name).write_bytes(content)
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        HookedTransformer.from_pretrained(hf_dir)


def test_missing_tensor_is_named(hf_dir: Path) -> None:
    state = load_file(hf_dir / "model.safetensors")
    del state["transformer.h.0.attn.c_proj.weight"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"lack tensor 'h\.0\.attn\.c_proj\.weight'"):
        HookedTransformer.from_pretrained(hf_dir)


def test_mis_shaped_tensor_is_named_with_both_shapes(tmp_path: Path) -> None:
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8)
    HookedTransformer(cfg).save(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["unembed.W_U"] = torch.zeros(16, 21)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        ModelFileError, match=r"'unembed.W_U' has shape \(16, 21\), expected \(16, 20\)"
    ):
        HookedTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_embd", "64", r"field 'n_embd' must be an int"),
        ("n_layer", [1], r"field 'n_layer' must be an int"),
        ("n_head", -4, r"field 'n_head' must be an int in \[0, "),
        ("n_layer", True, r"field 'n_layer' must be an int"),
        ("layer_norm_epsilon", "1e-5", r"field 'layer_norm_epsilon' must be a positive number"),
        ("layer_norm_epsilon", float("nan"), r"must be a positive number"),
        ("model_type", ["gpt2"], r"field 'model_type' must be a string"),
        ("vocab_size", 10**12, r"field 'vocab_size' must be an int in \[0, "),
    ],
)
def test_wrong_hf_field_types_name_config_json_and_the_field(
    hf_dir: Path, field: str, value: object, message: str
) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as raised:
        HookedTransformer.from_pretrained(hf_dir)
    assert "config.json" in str(raised.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_model", "32", "d_model must be an int"),
        ("norm_eps", float("inf"), "norm_eps must be a finite number"),
        ("n_layers", 10**9, "n_layers=1000000000 is implausibly large"),
        ("gated_mlp", "yes", "gated_mlp must be true or false"),
        ("sliding_window_layers", 3, "sliding_window_layers must be a list of int or null"),
        ("moe", {"n_experts": "4", "top_k": 2, "d_expert": 8}, "moe.n_experts must be an int"),
    ],
)
def test_wrong_native_field_types_name_the_file_and_field(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_vocab=20, n_ctx=8)
    HookedTransformer(cfg).save(tmp_path)
    data = json.loads((tmp_path / "mitk_config.json").read_text()) | {field: value}
    (tmp_path / "mitk_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as raised:
        HookedTransformer.from_pretrained(tmp_path)
    assert "mitk_config.json" in str(raised.value)


def test_huge_native_config_stops_before_building_with_the_estimate(tmp_path: Path) -> None:
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_vocab=20, n_ctx=8)
    HookedTransformer(cfg).save(tmp_path)
    data = json.loads((tmp_path / "mitk_config.json").read_text())
    data |= {"n_layers": 1_000_000, "d_model": 4096, "n_heads": 32}
    (tmp_path / "mitk_config.json").write_text(json.dumps(data))
    with pytest.raises(ModelTooLargeError, match=r"needs about [\d.]+ GB \([\d,]+ parameters"):
        HookedTransformer.from_pretrained(tmp_path)


def test_user_limit_applies_to_loading_and_to_building(
    hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelTooLargeError, match=r"max_memory_gb=1e-06"):
        HookedTransformer.from_pretrained(hf_dir, max_memory_gb=1e-6)
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "0.000001")
    with pytest.raises(ModelTooLargeError, match=r"MITK_MAX_MEMORY_GB=0\.000001"):
        HookedTransformer(TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_vocab=20, n_ctx=8))
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "lots")
    with pytest.raises(ConfigError, match="MITK_MAX_MEMORY_GB='lots' is not a number"):
        HookedTransformer.from_pretrained(hf_dir)
    monkeypatch.delenv(memory.LIMIT_VARIABLE)
    assert HookedTransformer.from_pretrained(hf_dir, max_memory_gb=1.0).cfg.n_layers == 1


def test_loading_counts_the_weight_files_too(hf_dir: Path) -> None:
    model = HookedTransformer.from_pretrained(hf_dir)
    model_bytes = memory.estimate_bytes(model.cfg)
    files_bytes = (hf_dir / "model.safetensors").stat().st_size
    limit_gb = (model_bytes + files_bytes / 2) / memory.GB  # fits the model, not both
    with pytest.raises(ModelTooLargeError, match="GB of weight files"):
        HookedTransformer.from_pretrained(hf_dir, max_memory_gb=limit_gb)


CONFIGS = {
    "gpt2-like": TransformerConfig(d_model=32, n_layers=3, n_heads=4, d_vocab=50, n_ctx=16),
    "llama-like": TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, n_key_value_heads=2, d_vocab=50, n_ctx=16,
        gated_mlp=True, normalization="rmsnorm", positional="rotary", attn_qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, qk_norm="head",
    ),
    "bert-like": TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, token_types=2,
        embed_norm=True, norm_position="post", final_norm=False, causal=False,
    ),
    "moe-some-layers": TransformerConfig(
        d_model=32, n_layers=4, n_heads=4, d_vocab=50, n_ctx=16, gated_mlp=True,
        positional="rotary", moe=MoEConfig(n_experts=4, top_k=2, d_expert=8, d_shared=16,
                                           shared_gate=True, layers=[1, 3]),
    ),
    "mla": TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, d_head=12, rotary_dim=4,
        positional="rotary", attention_type="mla", kv_lora_rank=8, q_lora_rank=6, v_head_dim=8,
        normalization="rmsnorm", gated_mlp=True,
    ),
    "gemma2-like-bf16": TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, sandwich_norms=True,
        positional="rotary", attn_sinks=True, dtype="bfloat16",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_counts_exactly_the_parameters_built(name: str) -> None:
    cfg = CONFIGS[name]
    model = HookedTransformer(cfg)
    assert memory.parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    assert built <= memory.estimate_bytes(cfg) <= 2 * built


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_t5_estimate_counts_exactly_the_parameters_built(proj: str) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    from mitk.model.encoder_decoder import HookedEncoderDecoder
    from mitk.model.pretrained.t5 import t5_parameter_count

    hf = T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64,
        num_layers=2, num_decoder_layers=3, num_heads=4, feed_forward_proj=proj))  # fmt: skip
    model = HookedEncoderDecoder.from_pretrained(hf)
    assert t5_parameter_count(model.cfg) == sum(p.numel() for p in model.parameters())


def test_huge_or_malformed_t5_config_stops_before_reading_weights(tmp_path: Path) -> None:
    from mitk.model.encoder_decoder import HookedEncoderDecoder

    config = {"model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_kv": 128,
              "d_ff": 16384, "num_layers": 10**5, "num_heads": 64}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)  # would fail if it were read
    with pytest.raises(ModelTooLargeError, match=rf"{tmp_path} needs about .* GB"):
        HookedEncoderDecoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        HookedEncoderDecoder.from_pretrained(tmp_path)
