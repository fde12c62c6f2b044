"""Hybrids of Mamba-2 mixers and attention, an MLP after each (``SSMConfig.mlp``, Bamba's
layout): hooks, stream identities, DLA, patching, refusals, generation and the config."""

from __future__ import annotations

import re

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.dla import logit_attribution
from mitk.config import MoEConfig, SSMConfig
from mitk.errors import ConfigError, UnknownHookError, UnsupportedModelError
from mitk.hooks import name
from tests.naive_patching import patched_both_ways

VOCAB, D, F = 40, 16, 24  # vocabulary, d_model, d_mlp
MIXERS, ATTENTION = [0, 2], [1, 3]


def _config(mlp: bool = True, **fields: object) -> TransformerConfig:
    ssm = SSMConfig(d_inner=32, d_state=5, d_conv=4, dt_rank=1, variant="mamba2", n_heads=4,
                    n_groups=2, layers=MIXERS, mlp=mlp)  # fmt: skip
    return TransformerConfig(**{
        "d_model": D, "n_layers": 4, "n_heads": 4, "n_key_value_heads": 2, "d_vocab": VOCAB,
        "n_ctx": 64, "d_mlp": F, "gated_mlp": True, "act_fn": "silu", "normalization": "rmsnorm",
        "positional": "rotary", "rotary_dim": 2, "ssm": ssm, **fields,
    })  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    m = HookedTransformer(_config(), seed=3)
    with torch.no_grad():  # larger than the init's, so that every part matters
        for param in m.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    return m.eval()


def _tokens(batch: int = 2, pos: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_a_mixer_layer_adds_its_mlp_after_the_mixer(model: HookedTransformer) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    for layer in MIXERS:
        pre, mid = cache[name("resid_pre", layer)], cache[name("resid_mid", layer)]
        torch.testing.assert_close(mid, pre + cache[name("mixer_out", layer)], atol=0, rtol=0)
        post = cache[name("resid_post", layer)]
        torch.testing.assert_close(post, mid + cache[name("mlp_out", layer)], atol=0, rtol=0)
        block = model.blocks[layer]
        with torch.no_grad():
            again = block.mlp(block.ln2(mid))
        torch.testing.assert_close(cache[name("mlp_out", layer)], again, atol=1e-6, rtol=0)
        for kind in ("pre", "pre_linear", "post"):
            assert cache[name(kind, layer)].shape == (2, 9, F)
        assert cache[f"blocks.{layer}.ln2.hook_scale"].shape == (2, 9, 1)
    assert cache[name("pattern", 1)].shape == (2, 4, 9, 9)
    with pytest.raises(UnknownHookError, match="did you mean"):
        model.run_with_cache(_tokens(), names_filter=["blocks.0.attn.hook_z"])


def test_a_mamba_layer_without_mlp_keeps_one_write() -> None:
    pure = HookedTransformer(_config(mlp=False, d_mlp=F), seed=0)
    assert name("resid_mid", 0) not in pure.hook_dict and name("mlp_out", 0) not in pure.hook_dict
    with pytest.raises(UnsupportedModelError, match="no MLP neurons"):
        pure.blocks[0].mlp  # noqa: B018


def test_the_stream_decomposes_into_mixer_attention_and_mlp_writes(
    model: HookedTransformer,
) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_mixer_out", "0_mlp_out", "1_attn_out", "1_mlp_out",
                      "2_mixer_out", "2_mlp_out", "3_attn_out", "3_mlp_out"]  # fmt: skip
    torch.testing.assert_close(parts.sum(0), cache[name("resid_post", 3)], atol=1e-5, rtol=0)
    before_mlp, labels = cache.decompose_resid(layer=2, mlp_input=True, return_labels=True)
    assert labels[-1] == "2_mixer_out"
    torch.testing.assert_close(before_mlp.sum(0), cache[name("resid_mid", 2)], atol=1e-5, rtol=0)
    _, acc_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert acc_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "3_pre", "3_mid",
                          "final_post"]  # fmt: skip


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_logit_attribution_sums_to_the_logit_difference(model: HookedTransformer, by: str) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    answer, wrong = torch.tensor([3, 5]), torch.tensor([7, 1])
    attribution = logit_attribution(model, cache, answer, wrong, pos=-2, by=by)  # type: ignore[arg-type]
    torch.testing.assert_close(attribution.total(), attribution.actual, atol=1e-5, rtol=0)
    labels = attribution.labels
    assert "0_mixer_out" in labels and "2_mixer_out" in labels  # a mixer is whole at any `by`
    if by == "head":
        assert "L1H3" in labels and "L3_attn_bias" in labels and "0_mlp_out" in labels
    if by == "neuron":  # the MLP after a mixer has neurons as any other
        assert f"L0N{F - 1}" in labels and "L2_mlp_bias" in labels and "0_mlp_out" not in labels
        whole = logit_attribution(model, cache, answer, wrong, pos=-2)
        rows = [i for i, label in enumerate(labels) if label.startswith("L0")]
        torch.testing.assert_close(
            attribution.values[rows].sum(0),
            whole.values[whole.labels.index("0_mlp_out")], atol=1e-5, rtol=0,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("site", "layers"),
    [("resid_pre", [0, 1, 2, 3]), ("resid_mid", [0, 1, 2, 3]), ("mixer_out", MIXERS),
     ("gated", MIXERS), ("attn_out", ATTENTION), ("z", ATTENTION), ("mlp_out", [0, 1, 2, 3]),
     ("post", [0, 1, 2, 3])],
)  # fmt: skip
def test_activation_patching_equals_one_forward_per_cell(
    model: HookedTransformer, site: str, layers: list[int]
) -> None:
    result, expected = patched_both_ways(model, _tokens(pos=7, seed=4), 2, site)
    assert result.layers == layers
    assert result.per_prompt.abs().max() > 0
    torch.testing.assert_close(result.per_prompt, expected, atol=1e-5, rtol=0)


def test_attention_analyses_of_mixer_layers_are_refused_by_name(
    model: HookedTransformer,
) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens())
    for ask in (
        lambda: model.blocks[0].attn,
        lambda: model.W_Q,
        lambda: model.OV,
        lambda: cache.stack_head_results(),
        lambda: cache.get_full_resid_decomposition(),
        lambda: model.process_weights(fold_ln=True),
    ):
        with pytest.raises(UnsupportedModelError, match=r"layer 0 is a (Mamba|state-space)"):
            ask()


def test_generation_carries_keys_and_states_and_padding_reads_as_alone(
    model: HookedTransformer,
) -> None:
    greedy = {"do_sample": False, "stop_at_eos": False, "verbose": False}
    tokens = _tokens(pos=6)
    cached = model.generate(tokens, 8, **greedy)
    rerun = model.generate(tokens, 8, use_past_kv_cache=False, **greedy)
    assert torch.equal(cached, rerun)
    short, long = _tokens(batch=1, pos=4, seed=5), _tokens(batch=1, pos=7, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    together = model.generate(batch, 6, attention_mask=mask, **greedy)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, 6, **greedy)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist()


def test_trains() -> None:
    fresh = HookedTransformer(_config(), seed=1)
    fresh(_tokens(), return_type="loss").backward()
    block = fresh.blocks[0]
    params = (block.mixer.A_log, block.mixer.W_conv, block.mlp.W_gate, block.ln2.w)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def test_config_round_trips_and_validates() -> None:
    cfg = _config()
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="d_mlp > 0"):
        _config(d_mlp=0)
    with pytest.raises(ConfigError, match="mixture of experts after an ssm mixer"):
        _config(moe=MoEConfig(n_experts=4, top_k=2, d_expert=8, layers=[1, 2]))


BAMBA = {"hidden_size": 64, "mamba_n_heads": 8, "num_hidden_layers": 2, "vocab_size": 50,
         "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
         "max_position_embeddings": 64}  # fmt: skip
MAMBA2 = {"hidden_size": 64, "num_heads": 8, "num_hidden_layers": 2, "vocab_size": 50}


@pytest.mark.parametrize(
    ("family", "hf", "head_dim", "names"),
    [
        ("bamba", BAMBA, "mamba_d_head", "bamba mamba_n_heads * mamba_d_head"),
        ("mamba2", MAMBA2, "head_dim", "mamba2 num_heads * head_dim"),
    ],
)
def test_mamba2_mixers_refuse_heads_that_do_not_tile_the_width(
    family: str, hf: dict, head_dim: str, names: str
) -> None:
    """One Mamba-2 mixer builder serves both families: 8 heads of 16 tile 2 * 64."""
    from mitk.model.pretrained.bamba import bamba_config
    from mitk.model.pretrained.mamba import mamba2_config

    convert = {"bamba": bamba_config, "mamba2": mamba2_config}[family]
    ssm = convert({**hf, head_dim: 16}).ssm
    assert ssm is not None and (ssm.variant, ssm.n_heads, ssm.d_inner) == ("mamba2", 8, 128)
    with pytest.raises(UnsupportedModelError, match=re.escape(f"{names} (8 * 4) must equal")):
        convert({**hf, head_dim: 4})
