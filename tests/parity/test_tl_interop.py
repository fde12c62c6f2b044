"""``HookedTransformer.from_transformer_lens`` / ``to_transformer_lens`` against transformer-lens.

Every conversion is checked the same way: logits (mitk's fused path) within
1e-4, and every hook mitk caches equal to TransformerLens's (a hook mitk has and
TransformerLens does not fire is a failure, not a skip). TransformerLens models
come from three places: its own configs with every parameter randomised (one
per architecture, plus hypothesis-drawn configs), its Hugging Face weight
converters run on the random checkpoints mitk loads directly (so the two paths
must agree exactly), and its weight processing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch import nn

from mitk import HookedTransformer, TransformerConfig
from mitk.config import RotaryScaling
from mitk.errors import UnsupportedModelError
from mitk.model.pretrained.tl_interop import TransformerLensNotInstalledError
from tests.parity.test_hf_families import _llama, _neox
from tests.parity.test_transformer_lens import _compare, _tl_hooked_transformer, tl_deprecation

pytestmark = tl_deprecation

TOL = 1e-4
BASE: dict[str, Any] = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8,
                        "d_vocab": 61, "n_ctx": 40, "seed": 0}  # fmt: skip
# TransformerLens config overrides, one per architecture both libraries share
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2-ln-learned-gelu": {"normalization_type": "LN", "act_fn": "gelu_new"},
    "llama-rms-rotary-gated-gqa": {
        "normalization_type": "RMS", "act_fn": "silu", "gated_mlp": True,
        "positional_embedding_type": "rotary", "n_key_value_heads": 2, "rotary_base": 500,
    },
    "neox-parallel-partial-rotary": {
        "normalization_type": "LN", "act_fn": "gelu", "parallel_attn_mlp": True,
        "positional_embedding_type": "rotary", "rotary_dim": 4,
    },
    "gptj-parallel-adjacent-pairs": {
        "normalization_type": "LN", "act_fn": "gelu_new", "parallel_attn_mlp": True,
        "positional_embedding_type": "rotary", "rotary_dim": 6, "rotary_adjacent_pairs": True,
    },
    "folded-ln-pre": {"normalization_type": "LNPre", "act_fn": "relu"},
    "folded-rms-pre-mqa": {
        "normalization_type": "RMSPre", "act_fn": "silu", "gated_mlp": True,
        "positional_embedding_type": "rotary", "n_key_value_heads": 1,
    },
    "attn-only": {"normalization_type": "LN", "attn_only": True},
    "alibi": {"normalization_type": "LN", "act_fn": "gelu", "positional_embedding_type": "alibi"},
    "bloom-embed-norm-alibi": {
        "normalization_type": "LN", "act_fn": "gelu", "positional_embedding_type": "alibi",
        "post_embedding_ln": True,
    },
    "local-global-window-3": {
        "normalization_type": "LN", "act_fn": "relu", "use_local_attn": True, "window_size": 3,
        "attn_types": ["local", "global"],
    },
    "gemma2-sandwich-softcaps": {
        "normalization_type": "RMS", "act_fn": "gelu_pytorch_tanh", "gated_mlp": True,
        "positional_embedding_type": "rotary", "use_normalization_before_and_after": True,
        "attn_scores_soft_cap": 5.0, "output_logits_soft_cap": 3.0, "attn_scale": 3.0,
        "use_local_attn": True, "window_size": 4, "attn_types": ["local", "global"],
    },
    "unscaled-attention-bidirectional": {
        "normalization_type": "LN", "act_fn": "relu", "use_attn_scale": False,
        "attention_dir": "bidirectional",
    },
}  # fmt: skip


def _randomised(tl: Any, scale: float = 0.1) -> Any:
    """Noise on every parameter (biases and norms too), except what mitk cannot represent.

    TransformerLens adds a gated MLP's ``b_in`` after the gate product (mitk adds it
    to the linear branch), so that one stays zero; a refusal test covers it.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tl.named_parameters():
            if not (tl.cfg.gated_mlp and name.endswith("mlp.b_in")):
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return tl.eval()


def _tl_model(**overrides: Any) -> Any:
    from transformer_lens import HookedTransformer as TLHookedTransformer
    from transformer_lens import HookedTransformerConfig

    return _randomised(TLHookedTransformer(HookedTransformerConfig(**{**BASE, **overrides})))


def _tokens(d_vocab: int, batch: int = 2, pos: int = 11) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(5))


def assert_same_outputs(ours: HookedTransformer, tl: Any) -> float:
    """Logits and every hook mitk caches agree with TransformerLens's; the largest difference.

    Two documented exceptions are left out: ``hook_embed`` of a model normed after
    its embedding (TransformerLens hooks after that norm, mitk before), and that
    norm's own hooks, which TransformerLens names ``embed.ln.*`` (mitk ``ln_embed.*``).
    """
    tokens = _tokens(ours.cfg.d_vocab)
    with torch.no_grad():
        fused = ours(tokens)  # no hooks: the fused attention path
        their_logits, theirs = tl.run_with_cache(tokens)
        logits, cache = ours.run_with_cache(tokens)
    torch.testing.assert_close(fused, their_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, their_logits, atol=TOL, rtol=0)
    ours_names = {n for n in cache if not n.startswith("ln_embed.")}
    if ours.cfg.embed_norm:
        ours_names.discard("hook_embed")
    missing = sorted(ours_names - set(theirs.keys()))
    assert not missing, f"TransformerLens never fires {missing}"
    names = sorted(ours_names)
    _compare(cache, theirs, names, tokens.shape[0])
    return max(float((cache[n] - theirs[n]).abs().nan_to_num(0, 0, 0).max()) for n in names)


def assert_same_state(a: HookedTransformer, b: HookedTransformer, **cfg_differences: Any) -> None:
    """The same parameters, bit for bit, and the same config up to provenance (and these)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    same = {"architecture": "", "extra": {}}
    assert a.cfg.replace(**same, **cfg_differences) == b.cfg.replace(**same)


# --- TransformerLens -> mitk, per architecture --------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_from_transformer_lens_matches_every_shared_hook(arch: str) -> None:
    tl = _tl_model(**ARCHITECTURES[arch])
    ours = HookedTransformer.from_transformer_lens(tl)
    assert_same_outputs(ours, tl)
    assert not ours.training and ours.W_E.device == tl.W_E.device


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tl_to_mitk_to_tl_gives_every_parameter_back(arch: str) -> None:
    tl = _tl_model(**ARCHITECTURES[arch])
    back = HookedTransformer.from_transformer_lens(tl).to_transformer_lens()
    assert back.cfg.normalization_type == tl.cfg.normalization_type
    theirs, again = dict(tl.named_parameters()), dict(back.named_parameters())
    assert theirs.keys() == again.keys()
    if tl.cfg.positional_embedding_type == "alibi":  # built, never read: it comes back zero
        assert not again.pop("pos_embed.W_pos").any()
    for name, param in again.items():
        assert torch.equal(param, theirs[name]), name
    assert_same_outputs(HookedTransformer.from_transformer_lens(back), back)


def test_biases_zero_everywhere_become_no_biases_and_come_back_as_zeros() -> None:
    tl = _tl_model(**ARCHITECTURES["llama-rms-rotary-gated-gqa"])
    with torch.no_grad():
        for name, param in tl.named_parameters():
            if name.rsplit(".", 1)[-1] in ("b_Q", "_b_K", "_b_V", "b_in", "b_out", "b_U"):
                param.zero_()
    ours = HookedTransformer.from_transformer_lens(tl)
    assert (ours.cfg.attn_qkv_bias, ours.cfg.attn_out_bias) == (False, True)
    assert (ours.cfg.mlp_bias, ours.cfg.unembed_bias) == (False, False)
    assert ours.blocks[0].mlp.b_in is None and ours.unembed.b_U is None
    assert_same_outputs(ours, tl)
    back = ours.to_transformer_lens()
    assert not back.blocks[1].attn._b_K.any() and not back.unembed.b_U.any()


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(["LN", "LNPre", "RMS", "RMSPre"]),
    positional=st.sampled_from(["standard", "rotary", "alibi"]),
    block=st.sampled_from(["sequential", "parallel", "attn_only"]),
    gated=st.booleans(),
    act=st.sampled_from(["gelu", "gelu_new", "relu", "silu", "gelu_fast"]),
    kv_heads=st.sampled_from([None, 1, 2, 4]),
    rotary=st.sampled_from([(2, False), (8, False), (4, True), (8, True)]),
    window=st.sampled_from([None, ["local", "global"], ["global", "local"], ["local", "local"]]),
)
def test_from_transformer_lens_on_drawn_configs(
    norm: str,
    positional: str,
    block: str,
    gated: bool,
    act: str,
    kv_heads: int | None,
    rotary: tuple[int, bool],
    window: list[str] | None,
) -> None:
    cfg: dict[str, Any] = {
        "normalization_type": norm, "positional_embedding_type": positional,
        "parallel_attn_mlp": block == "parallel", "attn_only": block == "attn_only",
        "gated_mlp": gated, "act_fn": act, "n_key_value_heads": kv_heads,
    }  # fmt: skip
    if positional == "rotary":
        cfg |= {"rotary_dim": rotary[0], "rotary_adjacent_pairs": rotary[1]}
    if window is not None:
        cfg |= {"use_local_attn": True, "window_size": 3, "attn_types": window}
    tl = _tl_model(**cfg)
    ours = HookedTransformer.from_transformer_lens(tl)
    assert_same_outputs(ours, tl)
    assert_same_state(HookedTransformer.from_transformer_lens(ours.to_transformer_lens()), ours)


# --- TransformerLens's own converters and processing agree with mitk's loader -------------
def _tl_llama(hf: Any) -> Any:
    from transformer_lens import HookedTransformer as TLHookedTransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=64, eps=c.rms_norm_eps,
        d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS", gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=c.hidden_size // c.num_attention_heads,
        final_rms=True, original_architecture="LlamaForCausalLM",
    )  # fmt: skip
    model = TLHookedTransformer(cfg)
    model.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    return model.eval()


def _tl_neox(hf: Any) -> Any:
    from transformer_lens import HookedTransformer as TLHookedTransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_neox_weights

    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=64, eps=c.layer_norm_eps,
        d_vocab=c.vocab_size, act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=int(d_head * c.rope_parameters["partial_rotary_factor"]),
        original_architecture="GPTNeoXForCausalLM",
    )  # fmt: skip
    model = TLHookedTransformer(cfg)
    model.load_state_dict(convert_neox_weights(hf, cfg), strict=False)
    return model.eval()


def _randomised_hf(hf: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return hf.eval()


HF_FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[Any], Any]]] = {
    "llama-gqa": (_llama, _tl_llama),
    "neox-parallel-partial-rotary": (_neox, _tl_neox),
}


def test_tl_gpt2_converts_to_exactly_mitks_own_load(
    gpt2_dir: Path, gpt2: HookedTransformer
) -> None:
    tl = _tl_hooked_transformer(gpt2_dir)  # built with default_prepend_bos=False
    ours = HookedTransformer.from_transformer_lens(tl)
    assert not ours.cfg.default_prepend_bos
    assert_same_state(ours, gpt2, default_prepend_bos=True)
    assert_same_outputs(ours, tl)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_tl_converted_families_are_exactly_mitks_own_load(family: str) -> None:
    make_hf, make_tl = HF_FAMILIES[family]
    torch.manual_seed(0)
    hf = _randomised_hf(make_hf())
    tl = make_tl(hf)
    ours = HookedTransformer.from_transformer_lens(tl)
    assert_same_state(ours, HookedTransformer.from_pretrained(hf))
    assert_same_outputs(ours, tl)


FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def test_tl_processed_gpt2_matches_mitk_processing(gpt2_dir: Path) -> None:
    tl = _tl_hooked_transformer(gpt2_dir)
    tl.load_and_process_state_dict(tl.state_dict(), **dict.fromkeys(FLAGS, True))
    assert tl.cfg.normalization_type == "LNPre"
    ours = HookedTransformer.from_transformer_lens(tl)
    assert ours.cfg.extra["processing"] == ["fold_ln"]
    assert_same_outputs(ours, tl)
    processed = HookedTransformer.from_pretrained(gpt2_dir, **dict.fromkeys(FLAGS, True))
    theirs = processed.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0, msg=key)
    # mitk's fold_ln is idempotent on the converted model: its norms already read the identity
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.process_weights(fold_ln=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)


def test_tl_processed_llama_matches_tl() -> None:
    torch.manual_seed(0)
    tl = _tl_llama(_randomised_hf(_llama()))
    # RMSNorm: TransformerLens folds the weights (RMSPre); writes are not centred there
    flags = {"fold_ln": True, "center_unembed": True, "fold_value_biases": True}
    tl.load_and_process_state_dict(tl.state_dict(), center_writing_weights=False, **flags)
    assert tl.cfg.normalization_type == "RMSPre"
    ours = HookedTransformer.from_transformer_lens(tl)
    assert_same_outputs(ours, tl)
    assert ours.to_transformer_lens().cfg.normalization_type == "RMSPre"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_dtype_travels_and_weights_stay_bit_equal(dtype: torch.dtype) -> None:
    tl = _tl_model(**ARCHITECTURES["llama-rms-rotary-gated-gqa"], dtype=dtype)
    ours = HookedTransformer.from_transformer_lens(tl)
    assert ours.cfg.dtype == str(dtype).removeprefix("torch.") and ours.W_E.dtype == dtype
    back = ours.to_transformer_lens()
    assert back.cfg.dtype == dtype
    for name, param in tl.named_parameters():
        assert torch.equal(param, dict(back.named_parameters())[name]), name


# --- mitk -> TransformerLens ---------------------------------------------------------------
def test_to_transformer_lens_is_tls_own_gpt2(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    theirs = _tl_hooked_transformer(gpt2_dir)
    tl = gpt2.to_transformer_lens()
    expected = {n: p for n, p in theirs.named_parameters() if n != "unembed.b_U"}
    for name, param in tl.named_parameters():
        if name in expected:
            assert torch.equal(param, expected[name]), name
    assert not tl.unembed.b_U.any()  # GPT-2 has no unembedding bias: zeros in TransformerLens
    assert tl.cfg.default_prepend_bos == gpt2.cfg.default_prepend_bos
    assert_same_outputs(gpt2, tl)


def test_mitk_processed_model_goes_over_as_folded_norms(gpt2_dir: Path) -> None:
    ours = HookedTransformer.from_pretrained(gpt2_dir, **dict.fromkeys(FLAGS, True))
    tl = ours.to_transformer_lens()
    assert tl.cfg.normalization_type == "LNPre"
    assert_same_outputs(ours, tl)
    theirs = _tl_hooked_transformer(gpt2_dir)
    theirs.load_and_process_state_dict(theirs.state_dict(), **dict.fromkeys(FLAGS, True))
    reference = dict(theirs.named_parameters())
    for name, param in tl.named_parameters():
        torch.testing.assert_close(param, reference[name], atol=1e-5, rtol=0, msg=name)
    # norms edited after folding are no longer folded: they go over with their weights
    with torch.no_grad():
        ours.blocks[0].ln1.w.mul_(2.0)
    edited = ours.to_transformer_lens()
    assert edited.cfg.normalization_type == "LN"
    assert_same_outputs(ours, edited)


def _mitk_models(gpt2: HookedTransformer) -> dict[str, Callable[[], HookedTransformer]]:
    torch.manual_seed(0)
    return {
        "gpt2": lambda: gpt2,
        "toy-induction": lambda: HookedTransformer.from_pretrained("toy-induction"),
        "llama-gqa-no-biases": lambda: HookedTransformer.from_pretrained(
            _randomised_hf(_llama())
        ),
        "neox": lambda: HookedTransformer.from_pretrained(_randomised_hf(_neox())),
        "gemma2-like-random": lambda: HookedTransformer(
            TransformerConfig(
                d_model=32, n_layers=2, n_heads=4, n_key_value_heads=2, d_vocab=61, n_ctx=40,
                d_mlp=48, normalization="rmsnorm", positional="rotary", gated_mlp=True,
                act_fn="gelu_tanh", sandwich_norms=True, attn_softcap=4.0, output_softcap=2.0,
                sliding_window=3, sliding_window_layers=[0], attn_qkv_bias=False,
                attn_out_bias=False, mlp_bias=False, attn_scale=0.3,
            ),
            seed=3,
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["gpt2", "toy-induction", "llama-gqa-no-biases", "neox", "gemma2-like-random"]
)
def test_mitk_to_tl_to_mitk_is_the_identity(name: str, gpt2: HookedTransformer) -> None:
    ours = _mitk_models(gpt2)[name]()
    tl = ours.to_transformer_lens()
    assert_same_outputs(ours, tl)
    assert_same_state(HookedTransformer.from_transformer_lens(tl), ours)


# --- the tokenizer travels ------------------------------------------------------------------
TEXTS = ["the cat sat on the mat", "a big red dog"]


def test_tokenizer_travels_both_ways(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    from transformers import AutoTokenizer

    tl = gpt2.to_transformer_lens()
    assert tl.tokenizer is not None
    for prepend_bos in (True, False):
        theirs = tl.to_tokens(TEXTS, prepend_bos=prepend_bos)
        assert torch.equal(gpt2.to_tokens(TEXTS, prepend_bos=prepend_bos), theirs)
    assert gpt2.to_str_tokens(TEXTS[0]) == tl.to_str_tokens(TEXTS[0])

    tl_with_tokenizer = _tl_hooked_transformer(gpt2_dir)
    tl_with_tokenizer.set_tokenizer(AutoTokenizer.from_pretrained(gpt2_dir), "left")
    ours = HookedTransformer.from_transformer_lens(tl_with_tokenizer)
    assert ours.tokenizer is tl_with_tokenizer.tokenizer
    assert torch.equal(ours.to_tokens(TEXTS), tl_with_tokenizer.to_tokens(TEXTS))
    assert ours.to_string(ours.to_tokens(TEXTS[1])[0]) == tl_with_tokenizer.to_string(
        tl_with_tokenizer.to_tokens(TEXTS[1])[0]
    )
    back = ours.to_transformer_lens()
    assert back.tokenizer.padding_side == "left"


def test_models_without_tokenizers_stay_without() -> None:
    tl = _tl_model(**ARCHITECTURES["attn-only"])
    ours = HookedTransformer.from_transformer_lens(tl)
    assert tl.tokenizer is None and ours.tokenizer is None
    assert ours.to_transformer_lens().tokenizer is None


# --- refusals -------------------------------------------------------------------------------
# TransformerLens configs mitk cannot compute the same way: override -> field the error names
REFUSED_TL: dict[str, tuple[dict[str, Any], str]] = {
    "no-norms": ({"normalization_type": None}, "normalization_type=None"),
    "shortformer": ({"positional_embedding_type": "shortformer"}, "positional_embedding_type"),
    "solu-ln": ({"act_fn": "solu_ln"}, "act_fn='solu_ln'"),
    "inverse-layer-scale": ({"scale_attn_by_inverse_layer_idx": True},
                            "scale_attn_by_inverse_layer_idx=True"),
    "qk-norm": ({"use_qk_norm": True}, "use_qk_norm=True"),
    "final-rms-on-ln": ({"final_rms": True}, "final_rms=True"),
    "d-vocab-out": ({"d_vocab_out": 7}, "d_vocab_out=7"),
    "yarn": ({"positional_embedding_type": "rotary", "use_yarn_rope": True}, "use_yarn_rope"),
    "local-rotary-base": ({"positional_embedding_type": "rotary", "rotary_base_local": 10.0,
                           "use_local_attn": True, "window_size": 2,
                           "attn_types": ["local", "global"]}, "rotary_base_local=10.0"),
    "embed-norm-with-positions": ({"post_embedding_ln": True}, "post_embedding_ln=True"),
    "attention-sinks": ({"use_attention_sinks": True}, "use_attention_sinks=True"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_TL)
def test_tl_configs_mitk_cannot_reproduce_are_refused_by_field(case: str) -> None:
    overrides, field = REFUSED_TL[case]
    tl = _tl_model(**{"act_fn": "gelu", **overrides})
    with pytest.raises(UnsupportedModelError, match=f"TransformerLens config {field}"):
        HookedTransformer.from_transformer_lens(tl)


def test_gated_b_in_is_refused_both_ways() -> None:
    tl = _tl_model(**ARCHITECTURES["llama-rms-rotary-gated-gqa"])
    with torch.no_grad():
        tl.blocks[1].mlp.b_in.fill_(0.5)
    with pytest.raises(
        UnsupportedModelError, match=r"gated_mlp=True.*non-zero blocks\.1\.mlp\.b_in"
    ):
        HookedTransformer.from_transformer_lens(tl)
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8,
                            gated_mlp=True, normalization="rmsnorm")  # fmt: skip
    ours = HookedTransformer(cfg)
    with torch.no_grad():
        ours.blocks[0].mlp.b_in.fill_(0.5)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.mlp\.b_in"):
        ours.to_transformer_lens()


def test_a_parameter_mitk_has_no_place_for_is_never_dropped() -> None:
    tl = _tl_model(**ARCHITECTURES["gpt2-ln-learned-gelu"])
    tl.blocks[1].attn.extra_scale = nn.Parameter(torch.ones(4))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn\.extra_scale.*drop"):
        HookedTransformer.from_transformer_lens(tl)


# mitk configs TransformerLens's classic model cannot compute: field -> config overrides
REFUSED_MITK: dict[str, dict[str, Any]] = {
    "positional='sinusoidal'": {"positional": "sinusoidal"},
    "token_types=2": {"token_types": 2},
    "norm_position='post'": {"norm_position": "post"},
    "has_lm_head=False": {"has_lm_head": False},
    "attention_type='mla'": {
        "attention_type": "mla", "positional": "rotary", "rotary_dim": 4, "kv_lora_rank": 8,
    },
    "embed_norm=True": {"embed_norm": True},
    "sandwich_norms=True": {"sandwich_norms": True},
    "pre_norms=False": {"normalization": "rmsnorm", "sandwich_norms": True, "pre_norms": False},
    "qk_norm='head'": {"qk_norm": "head", "normalization": "rmsnorm"},
    "rotary_scaling=RotaryScaling": {
        "positional": "rotary", "rotary_scaling": RotaryScaling(kind="linear", factor=2.0),
    },
    r"rotary_scaling=RotaryScaling\(kind='longrope'": {
        "positional": "rotary", "rotary_scaling": RotaryScaling(
            kind="longrope", factor=4.0, original_context=8, short_factor=[1.0] * 4,
            long_factor=[2.0] * 4),
    },
    r"no_rotary_layers=\[0\]": {"positional": "rotary", "no_rotary_layers": [0]},
    r"rotary_local_layers=\[0\]": {"positional": "rotary", "rotary_local_layers": [0]},
}  # fmt: skip


@pytest.mark.parametrize("field", REFUSED_MITK)
def test_mitk_configs_tl_cannot_compute_are_refused_by_field(field: str) -> None:
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8,
                            **REFUSED_MITK[field])  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=f"mitk config {field}"):
        HookedTransformer(cfg).to_transformer_lens()


def test_only_the_classic_model_is_accepted(gpt2_dir: Path, gpt2: HookedTransformer) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(gpt2_dir))
    with pytest.raises(UnsupportedModelError, match=r"TransformerBridge.*from_pretrained"):
        HookedTransformer.from_transformer_lens(bridge)
    with pytest.raises(UnsupportedModelError, match="not HookedTransformer"):
        HookedTransformer.from_transformer_lens(gpt2)


def test_without_transformer_lens_the_error_says_what_to_install(
    gpt2: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # import now fails
    with pytest.raises(TransformerLensNotInstalledError, match=r"pip install 'transformer-lens<4'"):
        gpt2.to_transformer_lens()
    with pytest.raises(ImportError):  # also an ImportError, for code that checks for that
        HookedTransformer.from_transformer_lens(object())
