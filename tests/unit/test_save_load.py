"""mitk's own format round-trips exactly; HF directories load safely or fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import UnsupportedModelError
from tests.checkpoints import gpt2_hf_model


def test_native_round_trip_is_exact(tmp_path: Path, tiny: HookedTransformer) -> None:
    tiny.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"mitk_config.json", "model.safetensors"}
    loaded = HookedTransformer.from_pretrained(tmp_path)
    assert loaded.cfg == tiny.cfg
    tokens = torch.randint(0, 50, (2, 7))
    assert torch.equal(loaded(tokens), tiny(tokens))


def test_saves_from_before_the_packed_weight_rename_still_load(
    tmp_path: Path, tiny: HookedTransformer
) -> None:
    """Folders written when the packed output projection was ``W_o``/``b_o`` load unchanged."""
    from safetensors.torch import load_file, save_file

    tiny.save(tmp_path)
    weights = tmp_path / "model.safetensors"
    old_names = {"W_o_packed": "W_o", "b_o_param": "b_o"}
    state = {}
    for key, value in load_file(weights).items():
        head, _, leaf = key.rpartition(".")
        state[f"{head}.{old_names.get(leaf, leaf)}"] = value
    assert "blocks.0.attn.W_o" in state
    save_file(state, weights)
    loaded = HookedTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 50, (2, 7))
    assert torch.equal(loaded(tokens), tiny(tokens))


def test_round_trip_keeps_the_tokenizer(tmp_path: Path, gpt2: HookedTransformer) -> None:
    gpt2.save(tmp_path / "copy")
    loaded = HookedTransformer.from_pretrained(tmp_path / "copy")
    assert loaded.to_str_tokens("the cat sat") == ["<|endoftext|>", "the", "cat", "sat"]
    assert loaded.to_string(loaded.to_tokens("a big dog")[0]) == "<|endoftext|> a big dog"


def test_tokenizer_found_in_hf_directory(gpt2: HookedTransformer) -> None:
    tokens = gpt2.to_tokens(["the cat", "a red house when"], padding_side="left")
    assert tokens.shape == (2, 5) and tokens[0, 0] == gpt2.tokenizer.pad_token_id
    assert gpt2.to_string(tokens)[1] == "<|endoftext|> a red house when"


def test_dtype_override(tmp_path: Path, tiny: HookedTransformer) -> None:
    tiny.save(tmp_path)
    loaded = HookedTransformer.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.cfg.dtype == "float64" and loaded.W_E.dtype == torch.float64


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    gpt2_hf_model(n_layer=1).config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(UnsupportedModelError, match="safetensors only"):
        HookedTransformer.from_pretrained(tmp_path)


def test_config_missing_a_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="lacks field 'n_embd'"):
        HookedTransformer.from_pretrained(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlnet"}))
    with pytest.raises(UnsupportedModelError, match=r"'xlnet' is not supported; supported: .*gpt2"):
        HookedTransformer.from_pretrained(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HookedTransformer.from_pretrained(tmp_path / "nope")


def test_corrupt_native_config_is_a_clear_error(tmp_path: Path, tiny: HookedTransformer) -> None:
    tiny.save(tmp_path)
    cfg = json.loads((tmp_path / "mitk_config.json").read_text())
    cfg["n_heads"] = 0
    (tmp_path / "mitk_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        HookedTransformer.from_pretrained(tmp_path)


def test_attention_only_model_has_no_mlp_hooks() -> None:
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=10, n_ctx=8, d_mlp=0)
    model = HookedTransformer(cfg)
    assert not any("mlp" in n or "resid_mid" in n for n in model.hook_dict)
    with pytest.raises(UnsupportedModelError, match="attention-only"):
        _ = model.W_in
