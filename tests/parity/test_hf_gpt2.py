"""mitk against Hugging Face GPT-2 on the same random weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from tests.checkpoints import gpt2_hf_model, save_gpt2

TOL = 1e-4


def _hf_and_mitk(directory: Path) -> tuple[torch.nn.Module, HookedTransformer]:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
    return hf, HookedTransformer.from_pretrained(directory)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_log_probs_and_every_residual_match(tmp_path: Path, activation: str) -> None:
    hf, model = _hf_and_mitk(save_gpt2(tmp_path, activation=activation, n_layer=4))
    tokens = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = hf(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid_pre" in n)
    torch.testing.assert_close(
        logits.log_softmax(-1), hf_out.logits.log_softmax(-1), atol=TOL, rtol=0
    )
    # HF's hidden_states[L] is the stream entering block L; its last entry is after ln_f
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache["resid_pre", layer], hf_out.hidden_states[layer], atol=TOL, rtol=0
        )
    with torch.no_grad():
        hidden = model(tokens, return_type="hidden")
    torch.testing.assert_close(hidden, hf_out.hidden_states[-1], atol=TOL, rtol=0)


def test_in_memory_model_source_matches() -> None:
    hf = gpt2_hf_model(n_layer=2)
    model = HookedTransformer.from_pretrained(hf)
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=TOL, rtol=0)


def test_loss_matches_hf_labels_loss(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens, labels=tokens).loss
        got = gpt2(tokens, return_type="loss")
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = gpt2_hf_model(n_layer=2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = HookedTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=TOL, rtol=0)


def test_padded_batch_matches_hf_at_real_tokens(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    tokens = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0  # right padding on the first row
    with torch.no_grad():
        ours = gpt2(tokens, attention_mask=mask)
        theirs = hf(tokens, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=TOL, rtol=0)
