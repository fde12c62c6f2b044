"""mitk against transformer-lens 4.x's ``TransformerBridge`` on the same random checkpoints.

This folder runs in its own environment: ``make test-tl4`` builds ``.venv-tl4``
with transformer-lens 4.3 (the main suite keeps 3.x, which SAELens pins) and
runs it; the main ``make test`` never collects it. The bridge boots offline on
local Hugging Face directories (or an in-memory model) and is compared with
mitk's load of the same weights: logits within 1e-4, and every hook mitk caches
equal to the bridge's activation of the same name (the bridge's names are
TransformerLens's), except the few the bridge does not offer, listed per family.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from mitk import HookedTransformer
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.tl_interop import TransformerLensNotInstalledError
from tests.checkpoints import word_tokenizer
from tests.parity.test_transformer_lens import _compare

TL_VERSION = version("transformer-lens")
if not TL_VERSION.startswith("4."):  # the wrong environment: say so rather than test 3.x
    raise RuntimeError(f"tests/tl4 runs against transformer-lens 4.x, found {TL_VERSION}")

TOL = 1e-4
FLAGS = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
         "fold_value_biases": True}  # fmt: skip


def _randomised(hf: nn.Module) -> nn.Module:
    """HF initialises norms to (1, 0) and biases to 0: noise on them so parity covers them."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return hf.eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=97,
                                      n_positions=64, bos_token_id=0, eos_token_id=0))  # fmt: skip


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=96, vocab_size=97,
                                        max_position_embeddings=64))  # fmt: skip


def _neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=96,
                                            rotary_pct=0.5, vocab_size=97,
                                            max_position_embeddings=64))  # fmt: skip


# family -> (random HF model, hooks mitk has and the bridge does not offer, per layer)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...]]] = {
    "gpt2": (_gpt2, ()),
    "llama-gqa": (_llama, ()),
    "neox-parallel-partial-rotary": (_neox, ("attn.hook_rot_q", "attn.hook_rot_k")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Each family's random model, saved with the word tokenizer as a Hugging Face directory."""
    out = {}
    for family, (make, _) in FAMILIES.items():
        torch.manual_seed(0)
        hf = _randomised(make())
        directory = tmp_path_factory.mktemp(family)
        hf.save_pretrained(directory)
        word_tokenizer().save_pretrained(directory)
        out[family] = (hf, directory)
    return out


def assert_matches_bridge(ours: HookedTransformer, bridge: Any, lacking: tuple[str, ...]) -> float:
    """Logits and every hook both expose agree; the largest difference over hooks and logits."""
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fused = ours(tokens)
        their_logits, theirs = bridge.run_with_cache(tokens)
        logits, cache = ours.run_with_cache(tokens)
    torch.testing.assert_close(fused, their_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, their_logits, atol=TOL, rtol=0)
    expected_missing = {f"blocks.{i}.{h}" for i in range(ours.cfg.n_layers) for h in lacking}
    assert set(cache) - set(theirs.keys()) == expected_missing
    names = sorted(set(cache) & set(theirs.keys()))
    _compare(cache, theirs, names, tokens.shape[0])
    diffs = [float((logits - their_logits).abs().max())]
    for name in names:
        if not name.endswith("hook_attn_scores"):  # masked entries differ by design
            diffs.append(float((cache[name] - theirs[name]).abs().max()))
    return max(diffs)


@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_matches_mitk_on_every_shared_hook(family: str, checkpoints: Any) -> None:
    _, directory = checkpoints[family]
    bridge = TransformerBridge.boot_transformers(str(directory))
    assert_matches_bridge(HookedTransformer.from_pretrained(directory), bridge, FAMILIES[family][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_compatibility_mode_matches_mitk_weight_processing(family: str, checkpoints: Any) -> None:
    _, directory = checkpoints[family]
    bridge = TransformerBridge.boot_transformers(str(directory))
    bridge.enable_compatibility_mode()
    flags = dict(FLAGS)
    if family == "llama-gqa":
        # mitk refuses to centre writes into an RMSNorm model (the mean matters there);
        # the bridge skips that step for RMSNorm: the same weights either way
        flags["center_writing_weights"] = False
    ours = HookedTransformer.from_pretrained(directory, **flags)
    assert_matches_bridge(ours, bridge, FAMILIES[family][1])


def test_in_memory_models_boot_alike(checkpoints: Any) -> None:
    hf, directory = checkpoints["llama-gqa"]
    ours = HookedTransformer.from_pretrained(hf)
    # the bridge wraps the modules of the model it is handed: give it a copy
    bridge = TransformerBridge.boot_transformers(str(directory), hf_model=copy.deepcopy(hf))
    assert_matches_bridge(ours, bridge, ())


def test_text_goes_through_the_same_tokens(checkpoints: Any) -> None:
    _, directory = checkpoints["gpt2"]
    bridge = TransformerBridge.boot_transformers(str(directory))
    ours = HookedTransformer.from_pretrained(directory)
    texts = ["the cat sat on the mat", "a big red dog"]
    assert torch.equal(ours.to_tokens(texts), bridge.to_tokens(texts))
    with torch.no_grad():
        torch.testing.assert_close(ours(texts[0]), bridge(texts[0]), atol=TOL, rtol=0)


def test_classic_interop_says_it_needs_transformer_lens_3(checkpoints: Any) -> None:
    _, directory = checkpoints["gpt2"]
    ours = HookedTransformer.from_pretrained(directory)
    with pytest.raises(TransformerLensNotInstalledError, match="transformer-lens<4"):
        ours.to_transformer_lens()
    bridge = TransformerBridge.boot_transformers(str(directory))
    with pytest.raises(UnsupportedModelError, match="from_pretrained"):
        HookedTransformer.from_transformer_lens(bridge)
