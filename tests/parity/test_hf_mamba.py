"""Mamba and Mamba-2 against Hugging Face: log-probs, every block's stream, generation.

Tiny random checkpoints (norm weights and biases perturbed, so those terms
count) are saved and loaded with ``HookedTransformer.from_pretrained``. Mamba
is not in ``test_hf_families``'s suite because that suite's checks are of
attention (fused against explicit paths, key-value heads) and it reads HF's
hidden states as the stream entering each block, while Mamba's are each
block's output (Mamba-2's are the stream entering each block again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.errors import UnsupportedModelError
from mitk.hooks import name
from tests.parity.hf_compare import token_batch
from tests.parity.test_hf_families import _randomised
from tests.parity.test_hf_generate import _sharpened

VOCAB = 64
VARIANTS: dict[str, dict[str, Any]] = {
    "mamba": {},
    # projection biases, no convolution bias, an explicit time-step rank, gelu in the conv
    "mamba-biases-gelu": {"use_bias": True, "use_conv_bias": False, "time_step_rank": 5,
                          "hidden_act": "gelu", "expand": 3},
    "mamba2": {"num_heads": 8, "head_dim": 8},
    # two groups of heads sharing B and C (and norm groups), biases, a 3-wide convolution
    "mamba2-groups-biases": {"num_heads": 8, "head_dim": 8, "n_groups": 2, "use_bias": True,
                             "conv_kernel": 3},
}  # fmt: skip


def _mamba(**overrides: Any) -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=3, conv_kernel=4,
        **overrides,
    )  # fmt: skip
    return MambaForCausalLM(config)


def _mamba2(**overrides: Any) -> nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=3, chunk_size=8,
        **overrides,
    )  # fmt: skip
    return Mamba2ForCausalLM(config)


def _build(variant: str) -> nn.Module:
    make = _mamba2 if variant.startswith("mamba2") else _mamba
    return make(**VARIANTS[variant])


def _lively(hf: nn.Module) -> nn.Module:
    """HF's init: the mixers' writes are small beside the embeddings and the time steps tiny,
    so the next token would hardly depend on the context. Larger ones make it depend on it."""
    with torch.no_grad():
        for layer in hf.backbone.layers:  # type: ignore[union-attr]
            mixer = layer.mixer
            dt_bias = mixer.dt_proj.bias if hasattr(mixer, "dt_proj") else mixer.dt_bias
            dt_bias.add_(1.0)
            mixer.out_proj.weight.mul_(8.0)
    return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.manual_seed(0)
    hf = _lively(_randomised(_build(request.param), seed=1))
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    return request.param, hf, HookedTransformer.from_pretrained(directory)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_log_probs_and_every_block_output_match(pair: Any, padding: str) -> None:
    variant, hf, model = pair
    tokens, mask = token_batch(VOCAB, padding != "none")
    if mask is not None and padding == "right":
        mask = mask.flip(-1)
    with torch.no_grad():
        hf_out = hf(tokens, attention_mask=mask, output_hidden_states=True)
        last_hidden = hf.backbone(tokens, attention_mask=mask).last_hidden_state
        logits, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=lambda n: "hook_resid_p" in n
        )
        hidden = model(tokens, attention_mask=mask, return_type="hidden")
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(
        logits.log_softmax(-1)[real], hf_out.logits.log_softmax(-1)[real], atol=1e-4, rtol=0
    )
    # Mamba's hidden_states[L] is block L's output, Mamba-2's the stream entering block L
    kind = "resid_pre" if variant.startswith("mamba2") else "resid_post"
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache[name(kind, layer)][real], hf_out.hidden_states[layer][real], atol=1e-4, rtol=0
        )
    final = cache[name("resid_post", model.cfg.n_layers - 1)]
    torch.testing.assert_close(model.ln_final(final)[real], last_hidden[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden[real], last_hidden[real], atol=1e-4, rtol=0)


def test_state_hooks_leave_the_output_unchanged(pair: Any) -> None:
    _, hf, model = pair
    tokens, _ = token_batch(VOCAB, padded=False)
    with torch.no_grad():
        expected = hf(tokens).logits
        logits, cache = model.run_with_cache(tokens, names_filter=name("ssm_state", 2))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert cache[name("ssm_state", 2)].shape == (3, 12, model.cfg.ssm.d_inner, 8)  # type: ignore[union-attr]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf_generate(variant: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = _sharpened(_lively(_randomised(_build(variant), seed=1)))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = HookedTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None  # both run all 10 steps
    with torch.no_grad():
        expected = hf.generate(tokens, do_sample=False, max_new_tokens=10, pad_token_id=0)
    ours = model.generate(tokens, 10, do_sample=False, stop_at_eos=False, verbose=False)
    assert ours.tolist() == expected.tolist()
    assert len(set(ours[:, 6:].flatten().tolist())) > 2  # not one token repeated


@pytest.mark.parametrize(
    ("variant", "field", "value"),
    [("mamba", "mixer_rms_eps", 1e-6), ("mamba", "use_falcon_mambapy", True),
     ("mamba", "time_step_limit", [0.0, 1.0]), ("mamba2", "time_step_limit", [0.0, 1.0]),
     ("mamba2", "rms_norm", False), ("mamba2", "norm_before_gate", True)],
)  # fmt: skip
def test_unknown_fields_are_refused_by_name(variant: str, field: str, value: Any) -> None:
    from mitk.model.pretrained import hf_config

    hf = _build(variant).config.to_dict()
    with pytest.raises(UnsupportedModelError, match=field):
        hf_config({**hf, field: value}, {}, "test")


def test_unsupported_activation_is_refused_by_name() -> None:
    from mitk.model.pretrained import hf_config

    hf = _mamba().config.to_dict()
    with pytest.raises(UnsupportedModelError, match="tanh"):
        hf_config({**hf, "hidden_act": "tanh"}, {}, "test")
