"""mitk against Hugging Face ``BigBirdModel`` (block-sparse, eval mode) on random checkpoints.

Blocks of 4 positions and 2 random blocks: sequences longer than ``(5 + 2*2) * 4 = 36``
positions run block-sparse, shorter ones fall back to full attention, as Hugging Face does.
Hugging Face's switch to full attention sticks to the model for later calls, so every
long run here first sets it back. In eval mode Hugging Face's random blocks are all
block 0, which the pattern shows as that block's keys weighted ``1 + r`` times. Norms are
perturbed so a missing norm weight or bias shows.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
import torch

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.errors import ModelFileError, UnsupportedModelError
from tests.op_shapes import created_shapes, has_square
from tests.parity.head_results import assert_head_results_sum_to_attn_out

TOL = 1e-4
VOCAB = 61
BLOCK, RANDOM = 4, 2
Built = tuple[torch.nn.Module, HookedTransformer, Path]


def hf_model(use_bias: bool = True, attention_type: str = "block_sparse") -> torch.nn.Module:
    """A random ``BigBirdModel`` with perturbed norms."""
    from transformers import BigBirdConfig, BigBirdModel

    torch.manual_seed(0)
    cfg = BigBirdConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                        block_size=BLOCK, num_random_blocks=RANDOM, use_bias=use_bias,
                        attention_type=attention_type, sep_token_id=3)  # fmt: skip
    hf = BigBirdModel(cfg).eval()
    with torch.no_grad():  # HF inits norms to w=1, b=0, which would hide a missing norm weight
        for module in hf.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return hf


def _load(hf: torch.nn.Module, directory: Path) -> Built:
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, HookedTransformer.from_pretrained(directory), directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _load(hf_model(), tmp_path_factory.mktemp("big_bird"))


def _batch(pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(3, VOCAB, (3, pos), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, pos - 7 :] = 0  # right padding, as the tokenizer pads
    mask[2, 10:] = 0
    return tokens, mask


def _hf_hidden(hf: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hf.set_attention_type("block_sparse")  # undo a fall-back an earlier short input left behind
    with torch.no_grad():
        return hf(tokens, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("pos", [40, 42, 37])  # whole blocks, a partial last block, the edge
def test_block_sparse_hidden_matches_hf(tiny: Built, pos: int) -> None:
    hf, model, _ = tiny
    tokens, mask = _batch(pos)
    real = mask.bool()
    ref = _hf_hidden(hf, tokens, mask)
    assert hf.attention_type == "block_sparse"
    with torch.no_grad():
        hidden = model(tokens, attention_mask=mask, return_type="hidden")
        assert model.attention_paths() == ["block_sparse: blocked"] * 2
        with model.backend("eager"):
            eager = model(tokens, attention_mask=mask, return_type="hidden")
    assert (hidden - ref)[real].abs().max() < TOL
    assert (eager - hidden).abs().max() < 1e-5  # padded rows too: both let them see themselves


@pytest.mark.parametrize("pos", [36, 20])
def test_short_sequences_fall_back_to_full_attention_as_hf_does(tiny: Built, pos: int) -> None:
    hf, model, _ = tiny
    tokens, mask = _batch(pos)
    ref = _hf_hidden(hf, tokens, mask)
    assert hf.attention_type == "original_full"  # and HF keeps it for later calls
    with torch.no_grad():
        hidden = model(tokens, attention_mask=mask, return_type="hidden")
    assert model.attention_paths() == ["sdpa"] * 2
    assert (hidden - ref)[mask.bool()].abs().max() < TOL


def test_full_attention_checkpoints_and_bias_free_projections_match_hf(tmp_path: Path) -> None:
    for case, hf in {
        "full": hf_model(attention_type="original_full"),
        "no_bias": hf_model(use_bias=False),
    }.items():
        _, model, _ = _load(hf, tmp_path / case)
        tokens, mask = _batch(42)
        with torch.no_grad():
            ref = hf(tokens, attention_mask=mask).last_hidden_state
            hidden = model(tokens, attention_mask=mask, return_type="hidden")
        assert (hidden - ref)[mask.bool()].abs().max() < TOL, case
        assert (model.cfg.block_sparse is None) == (case == "full")
        assert (model.blocks[0].attn.b_qkv is None) == (case == "no_bias")


def test_pattern_shows_the_sparse_pattern_used(tiny: Built) -> None:
    _, model, _ = tiny
    pos = 42
    tokens, mask = _batch(pos)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="hidden")
    pattern = cache["blocks.0.attn.hook_pattern"]
    scores = cache["blocks.0.attn.hook_attn_scores"]
    assert (pattern.sum(-1) - 1).abs().max() < 1e-5
    mixed = torch.einsum("bhqk,bkhd->bqhd", pattern, cache["blocks.0.attn.hook_v"])
    assert (mixed - cache["blocks.0.attn.hook_z"]).abs().max() < 1e-5
    # the block structure, from the definition: 11 blocks, the last partial
    block = torch.arange(pos) // BLOCK
    last = block[-1].item()
    qb, kb = block[:, None], block[None, :]
    reads = (qb == 0) | (qb == last) | (kb == 0) | (kb == last) | ((qb - kb).abs() <= 1)
    assert torch.equal(pattern[0] > 0, reads.expand_as(pattern[0]))  # row 0 has no padding
    for row, real in enumerate(mask.bool()):  # real queries read real keys on the pattern only
        expected = (reads & real[None, :])[real]
        assert torch.equal(pattern[row][:, real] > 0, expected.expand(4, -1, -1))
    # the random blocks (block 0 in eval mode) weigh the first block's keys 1 + r times
    q = cache["blocks.0.attn.hook_q"][0, :, 0]  # [pos, d_head], head 0
    k = cache["blocks.0.attn.hook_k"][0, :, 0]
    raw = q @ k.T * model.cfg.attn_scale
    middle, first = 12, 1  # query in block 3, key in block 0
    assert abs(scores[0, 0, middle, first] - raw[middle, first] - math.log(1 + RANDOM)) < 1e-5
    assert abs(scores[0, 0, 0, first] - raw[0, first]) < 1e-5  # a global query: no repeat
    assert scores[0, 0, middle, 30] == float("-inf")  # block 7 is outside block 3's window


def test_blocked_path_builds_no_position_by_position_matrix(tiny: Built) -> None:
    _, model, _ = tiny
    tokens, _ = _batch(44)
    with torch.no_grad():
        assert not has_square(created_shapes(lambda: model(tokens, return_type="hidden")), 44)
        hooked = created_shapes(lambda: model.run_with_cache(tokens, return_type="hidden"))
    assert has_square(hooked, 44)  # only a hook on scores or pattern builds it


def test_hook_patching_keeps_its_meaning(tiny: Built) -> None:
    _, model, _ = tiny
    tokens, mask = _batch(42)
    with torch.no_grad():
        target, other = model.run_with_cache(
            tokens.flip(0), attention_mask=mask, return_type="hidden",
            names_filter="blocks.1.hook_resid_pre",
        )  # fmt: skip
        source = other["blocks.1.hook_resid_pre"]
        patched = model.run_with_hooks(
            tokens, attention_mask=mask, return_type="hidden",
            fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: source)],
        )  # fmt: skip
    assert torch.equal(patched, target)


def test_refusals(tiny: Built, tmp_path: Path) -> None:
    from mitk.model.pretrained.big_bird import big_bird_config

    hf, model, directory = tiny
    tokens, mask = _batch(42)
    with pytest.raises(UnsupportedModelError, match="no LM head"):
        model(tokens)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="hidden")
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        logit_attribution(model, cache, answer_tokens=1)
    hf_cfg = hf.config.to_dict()
    with pytest.raises(UnsupportedModelError, match="made_up_switch"):
        big_bird_config({**hf_cfg, "made_up_switch": True})
    with pytest.raises(UnsupportedModelError, match="rescale_embeddings"):
        big_bird_config({**hf_cfg, "rescale_embeddings": True})
    state = load_file(str(directory / "model.safetensors"))
    state["encoder.layer.1.attention.self.key.weight"] = torch.zeros(32, 31)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError):
        HookedTransformer.from_pretrained(tmp_path)


def test_native_configs_round_trip_and_refuse_what_does_not_apply() -> None:
    from mitk.config import TransformerConfig
    from mitk.config.block_sparse import BlockSparseConfig
    from mitk.config.nystrom import NystromConfig
    from mitk.errors import ConfigError

    base = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_vocab": 11, "n_ctx": 64}
    kinds = [
        {"block_sparse": BlockSparseConfig(block_size=4, random_blocks=1)},
        {"nystrom": NystromConfig(num_landmarks=4, segment_means_seq_len=16)},
    ]
    for kind in kinds:
        cfg = TransformerConfig(**base, causal=False, **kind)
        assert TransformerConfig.from_json(cfg.to_json()) == cfg
        with pytest.raises(ConfigError, match="causal=True"):
            TransformerConfig(**base, **kind)
        with pytest.raises(ConfigError, match="rotary"):
            TransformerConfig(**base, causal=False, positional="rotary", **kind)
    with pytest.raises(ConfigError, match="conv_kernel_size"):
        NystromConfig(num_landmarks=4, segment_means_seq_len=16, conv_kernel_size=4)
    with pytest.raises(ConfigError, match="random_blocks"):
        BlockSparseConfig(block_size=4, random_blocks=-1)


def test_head_results_sum_to_the_attention_output_on_the_blocked_path(tiny: Built) -> None:
    _, model, _ = tiny
    tokens, mask = _batch(42)
    assert_head_results_sum_to_attn_out(model, tokens, mask, "block_sparse: blocked")
