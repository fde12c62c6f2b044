"""The converters' shared mappings on hand-made state dicts (parity suites cover real models)."""

from __future__ import annotations

import pytest
import torch

from mitk.errors import UnsupportedModelError
from mitk.model.pretrained import mappings, rope


def test_per_head_packing_is_reordered_as_all_q_then_k_then_v() -> None:
    # rows labelled (head, kind, d): packed head by head, two heads, d_head 2
    packed = torch.tensor(
        [[10 * h + k + 0.1 * d] for h in range(2) for k in range(3) for d in range(2)]
    )
    reordered = mappings.per_kind_order(packed, n_heads=2)[:, 0]
    expected = [10 * h + k + 0.1 * d for k in range(3) for h in range(2) for d in range(2)]
    torch.testing.assert_close(reordered, torch.tensor(expected))


def test_unembedding_is_the_first_stored_head_else_the_tied_embedding() -> None:
    w_e, w_head = torch.randn(5, 3), torch.randn(5, 3)
    tied = mappings.embeddings({"wte.weight": w_e}, "wte")
    assert torch.equal(tied["unembed.W_U"], w_e.T) and set(tied) == {"embed.W_E", "unembed.W_U"}
    sd = {"embed_in.weight": w_e, "lm_head.weight": w_head}
    untied = mappings.embeddings(sd, "embed_in", heads=("embed_out", "lm_head"))
    assert torch.equal(untied["unembed.W_U"], w_head.T)


def test_linear_weights_are_transposed_unless_the_layout_is_already_mitks() -> None:
    sd = {"p.weight": torch.randn(4, 3), "p.bias": torch.randn(4)}
    linear = mappings.linear(sd, "p", "W", "b")
    assert linear["W"].shape == (3, 4) and torch.equal(linear["b"], sd["p.bias"])
    assert mappings.linear(sd, "p", "W", transpose=False).keys() == {"W"}
    out = mappings.attn_out(sd, "p", "blocks.0.attn", bias=False)
    assert out.keys() == {"blocks.0.attn.W_o_packed"}


def test_decoder_fields_read_the_family_names_and_only_some_default_the_mlp() -> None:
    hf = {"n_embd": 8, "n_layer": 2, "n_head": 2, "n_inner": None, "vocab_size": 11,
          "n_positions": 16}  # fmt: skip
    fields = mappings.decoder_fields(hf, mappings.GPT2_NAMES, "gpt2")
    assert (fields["d_mlp"], fields["d_head"], fields["act_fn"]) == (32, 4, "gelu_tanh")
    llama = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}
    with pytest.raises(KeyError, match="intermediate_size"):  # LLaMA's width is never implied
        mappings.decoder_fields(llama, mappings.LLAMA_NAMES, "llama")


def test_scaled_rope_and_unknown_activations_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="yarn"):
        rope.rope_fields({"rope_scaling": {"rope_type": "yarn"}}, d_head=8)
    with pytest.raises(UnsupportedModelError, match="known"):
        mappings.hf_activation("mish")
