"""Greedy generation against Hugging Face ``generate(do_sample=False)``, token for token.

Each decoder family of ``test_hf_families`` (tiny random weights, fp32) is saved,
loaded into mitk, and both continue the same left-padded batch; HF gets the
attention mask (its ``generate`` derives position ids from it) and the same pad
and EOS ids, and computes attention eagerly (HF's SDPA path drops Gemma-2's
attention soft-cap). The LM head is replaced by a larger untied one so near-ties in the
random logits do not make the argmax depend on float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from tests.parity.hf_moe_builders import MOE_FAMILIES
from tests.parity.test_hf_families import (
    VOCAB,
    _bloom,
    _gemma,
    _gemma2,
    _gpt_neo,
    _gptj,
    _llama,
    _mistral,
    _neox,
    _qwen2,
)
from tests.parity.test_hf_mla import _deepseek

NEW = 8
FAMILIES: dict[str, Any] = {
    "gpt2": lambda: _gpt2(),
    "llama-gqa": _llama,
    "mistral-window-4": _mistral,
    "qwen2": _qwen2,
    "gpt-neox": _neox,
    "gptj": _gptj,
    # a wider init than HF's 0.02, as for GPT-2; a window of 4 over 14 tokens
    "gpt-neo-window-4": lambda: _gpt_neo(initializer_range=0.1),
    "bloom": lambda: _bloom(n_head=8),
    "gemma-gqa": _gemma,
    # caps small enough to bite: attention scores within +-5, logits within +-30
    "gemma2-window-softcaps": lambda: _gemma2(
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0
    ),
    "deepseek-v2-mla": lambda: _deepseek(q_lora_rank=20),
    **MOE_FAMILIES,
}


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # a wider init than HF's 0.02, else the final norm's bias alone picks every token
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                      n_positions=64, initializer_range=0.1))  # fmt: skip


def _sharpened(model: nn.Module) -> nn.Module:
    """A fresh, untied, larger LM head: well separated top logits, and no tied-embedding echo.

    Tied random embeddings make the next token mostly the current one, which would
    let a model that ignores positions and context pass.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(torch.randn(head.weight.shape, generator=gen) * 0.5)
        model.config.tie_word_embeddings = False
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_hf_generate(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = _sharpened(FAMILIES[family]())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    hf.config._attn_implementation = "eager"
    model = HookedTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    eos = hf.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) and eos < VOCAB else None
    with torch.no_grad():
        expected = hf.generate(
            tokens,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=0,
            eos_token_id=eos,
        )
    ours = model.generate(
        tokens, NEW, attention_mask=mask, pad_token_id=0, eos_token_id=() if eos is None else eos,
        do_sample=False, verbose=False,
    )  # fmt: skip
    assert ours.tolist() == expected.tolist()
