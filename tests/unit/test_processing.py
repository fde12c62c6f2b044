"""Weight processing: each step keeps log-probs, is idempotent, and is refused where invalid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.dla import logit_attribution
from mitk.errors import UnsupportedModelError
from mitk.model.processing import STEPS
from tests.unit.test_decompose import VARIANTS as DECOMPOSE_VARIANTS

TOL = 1e-4
VARIANTS = {
    **DECOMPOSE_VARIANTS,
    # grouped-query with value biases but no output bias: fold_value_biases must create b_O
    "qwen-like": {"normalization": "rmsnorm", "gated_mlp": True, "act_fn": "silu",
                  "n_key_value_heads": 2, "attn_out_bias": False, "mlp_bias": False},
    # LayerNorm biases with nowhere to go yet: fold_ln must create b_qkv, b_in and b_U
    "ln-no-bias": {"attn_qkv_bias": False, "attn_out_bias": False, "mlp_bias": False},
    "rotary-rmsnorm": {"normalization": "rmsnorm", "positional": "rotary", "n_key_value_heads": 2},
    "sinusoidal": {"positional": "sinusoidal"},  # a write to the stream that is no weight
}  # fmt: skip
LAYERNORM = [v for v in VARIANTS if VARIANTS[v].get("normalization") != "rmsnorm"]
RMSNORM = [v for v in VARIANTS if v not in LAYERNORM]


def build(variant: str, seed: int = 2) -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=40, n_ctx=16,
                            **VARIANTS[variant])  # fmt: skip
    model = HookedTransformer(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial norm weights and biases, so folding them matters
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    return tokens, mask


def _log_probs(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, attention_mask=mask).log_softmax(-1)[mask.bool()]


def _applicable(variant: str) -> list[str]:
    refused = set()
    if variant in RMSNORM:
        refused.add("center_writing_weights")
    if VARIANTS[variant].get("positional") == "rotary" or "n_key_value_heads" in VARIANTS[variant]:
        refused.add("refactor_factored_attn_matrices")
    return [s for s in STEPS if s not in refused]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_step_and_all_together_keep_log_probs(variant: str, padded) -> None:
    tokens, mask = padded
    expected = _log_probs(build(variant), tokens, mask)
    steps = _applicable(variant)
    for chosen in [[s] for s in steps] + [steps]:
        model = build(variant).process_weights(**dict.fromkeys(chosen, True))
        got = _log_probs(model, tokens, mask)
        message = f"{'+'.join(chosen)}: {{}}"
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0, msg=message.format)
        assert model.cfg.extra["processing"] == chosen


@pytest.mark.parametrize("variant", ["gpt2-like", "qwen-like"])
def test_every_step_is_idempotent(variant: str) -> None:
    steps = dict.fromkeys(_applicable(variant), True)
    once = build(variant).process_weights(**steps)
    twice = build(variant).process_weights(**steps).process_weights(**steps)
    assert twice.cfg == once.cfg
    for (name, a), (_, b) in zip(once.named_parameters(), twice.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_hook_values_change_only_as_documented(padded) -> None:
    tokens, mask = padded
    plain = build("gpt2-like")
    with torch.no_grad():
        _, before = plain.run_with_cache(tokens, attention_mask=mask)
        model = build("gpt2-like").process_weights(fold_ln=True)
        _, folded = model.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()
    for name in before:  # fold_ln changes weights only: every hook value stays put...
        if name == "unembed.hook_in":  # ...but the final norm's output, whose w and b left it
            continue
        a, b = folded[name], before[name]
        if name.endswith(("hook_pattern", "hook_attn_scores")):  # [batch, head, pos, key_pos]
            a, b = a.transpose(1, 2), b.transpose(1, 2)
        torch.testing.assert_close(a[real], b[real], atol=TOL, rtol=0, msg=name)
    assert torch.equal(model.ln_final.w, torch.ones(32)) and not model.ln_final.b.any()

    value_bias = model.blocks[0].attn.b_V.clone()  # after fold_ln, which folds ln1.b into it
    with torch.no_grad():
        model.process_weights(center_writing_weights=True, fold_value_biases=True)
        _, after = model.run_with_cache(tokens, attention_mask=mask)
    for name in ["hook_embed", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]:
        assert after[name].mean(-1).abs().max() < 1e-5, name  # writes are mean-free
    for name in ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post"]:
        torch.testing.assert_close(after[name][real], before[name][real], atol=TOL, rtol=0)
    b_v = before["blocks.0.attn.hook_v"] - after["blocks.0.attn.hook_v"]  # the value bias left
    torch.testing.assert_close(b_v, value_bias.expand_as(b_v), atol=1e-5, rtol=0)
    torch.testing.assert_close(after["blocks.0.hook_attn_out"], before["blocks.0.hook_attn_out"]
                               - before["blocks.0.hook_attn_out"].mean(-1, keepdim=True),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert not model.b_V.any()


@pytest.mark.parametrize("variant", ["gpt2-like", "llama-like"])
def test_dla_and_decomposition_stay_exact_after_processing(variant: str, padded) -> None:
    tokens, _ = padded
    steps = dict.fromkeys(_applicable(variant), True)
    model = build(variant).process_weights(**steps)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    answers, wrong = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 3])
    result = logit_attribution(model, cache, answers, wrong, by="head")
    last = logits[:, -1]
    expected = last[torch.arange(3), answers] - last[torch.arange(3), wrong]
    torch.testing.assert_close(result.total(), expected, atol=TOL, rtol=0)
    stack = cache.apply_ln_to_stack(cache.decompose_resid())
    normalized = cache["ln_final.hook_normalized"]
    torch.testing.assert_close(stack.sum(0), normalized, atol=TOL, rtol=0)


def test_fused_attention_and_hooks_still_work(padded) -> None:
    tokens, mask = padded
    model = build("gpt2-like").process_weights(**dict.fromkeys(STEPS, True))
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        assert model.attention_paths() == ["sdpa", "sdpa"]
        with model.backend("eager"):
            eager = model(tokens, attention_mask=mask)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=0)


def test_save_and_load_keep_processed_weights_and_record(tmp_path: Path, padded) -> None:
    tokens, mask = padded
    model = build("ln-no-bias").process_weights(fold_ln=True, fold_value_biases=True)
    assert model.cfg.attn_qkv_bias and model.cfg.mlp_bias and model.cfg.unembed_bias
    loaded = HookedTransformer.from_pretrained(model.save(tmp_path))
    assert loaded.cfg == model.cfg
    assert loaded.cfg.extra["processing"] == ["fold_ln", "fold_value_biases"]
    assert torch.equal(_log_probs(loaded, tokens, mask), _log_probs(model, tokens, mask))


def test_from_pretrained_flags(gpt2_dir: Path, gpt2: HookedTransformer, padded) -> None:
    tokens, mask = padded
    model = HookedTransformer.from_pretrained(gpt2_dir, fold_ln=True, center_unembed=True)
    assert model.cfg.extra["processing"] == ["fold_ln", "center_unembed"]
    assert "processing" not in gpt2.cfg.extra
    expected = _log_probs(gpt2, tokens, mask)
    torch.testing.assert_close(_log_probs(model, tokens, mask), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", RMSNORM)
def test_centering_writes_is_refused_on_rmsnorm_and_changes_nothing(variant: str) -> None:
    model = build(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"center_writing_weights.*'rmsnorm'"):
        model.process_weights(fold_ln=True, center_writing_weights=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "processing" not in model.cfg.extra


def test_center_unembed_is_refused_under_output_soft_capping() -> None:
    """A per-position logit shift changes log-probs once tanh caps the logits: refuse it."""
    plain = build("gpt2-like", seed=3)
    capped = HookedTransformer(plain.cfg.replace(output_softcap=2.0), seed=3)
    with torch.no_grad():
        capped.unembed.W_U.mul_(50)  # logits of a few units, where the cap bends them
    tokens = torch.randint(
        0, capped.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        before = capped(tokens).log_softmax(-1)
        with pytest.raises(UnsupportedModelError, match="output soft-capping"):
            capped.process_weights(center_unembed=True)
        assert torch.equal(capped(tokens).log_softmax(-1), before)
        # the refusal is real: shifting logits by a per-position constant moves log-probs here
        shifted = HookedTransformer(capped.cfg, seed=3)
        shifted.unembed.W_U.copy_(capped.unembed.W_U - capped.unembed.W_U.mean(-1, keepdim=True))
        moved = shifted(tokens).log_softmax(-1)
    assert (moved - before).abs().max() > 1e-3
    assert "processing" not in capped.cfg.extra


def test_layernorm_bias_with_no_gate_bias_is_refused() -> None:
    model = build("gpt2-like", seed=3)
    gated = HookedTransformer(model.cfg.replace(gated_mlp=True), seed=3)
    with torch.no_grad():
        gated.blocks[1].ln2.b.fill_(0.1)
    with pytest.raises(UnsupportedModelError, match="W_gate"):
        gated.process_weights(fold_ln=True)
    assert gated.blocks[0].ln1.b.eq(0).all() and gated.blocks[1].ln2.b.eq(0.1).all()


def test_unknown_flag_is_refused(tiny: HookedTransformer) -> None:
    with pytest.raises(TypeError, match="fold_layernorm"):
        tiny.process_weights(fold_layernorm=True)  # type: ignore[call-arg]


def test_a_norm_with_unknown_readers_is_refused() -> None:
    from mitk.model.norms import RMSNorm

    model = build("llama-like")
    model.blocks[0].ln_post = RMSNorm(model.cfg)  # e.g. a post-norm fold_ln knows nothing of
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.ln_post"):
        model.process_weights(fold_ln=True)


@pytest.mark.parametrize(("variant", "why"), [("rotary-rmsnorm", "rotary"),
                                              ("qwen-like", "key/value head")])  # fmt: skip
def test_refactor_is_refused_where_the_factors_are_not_per_head(variant: str, why: str) -> None:
    model = build(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=why):
        model.process_weights(fold_ln=True, refactor_factored_attn_matrices=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "processing" not in model.cfg.extra


@pytest.mark.parametrize("variant", ["gpt2-like", "ln-no-bias", "alibi-embed-norm"])
def test_refactor_changes_only_the_factor_basis(variant: str, padded) -> None:
    """Scores, patterns and head outputs stay; q/k (and v/z) change basis together, so
    each query-key dot product (with biases) and each z @ W_O stays."""
    tokens, mask = padded
    plain = build(variant)
    refactored = build(variant).process_weights(refactor_factored_attn_matrices=True)
    with torch.no_grad():
        _, before = plain.run_with_cache(tokens, attention_mask=mask)
        _, after = refactored.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()
    for layer in range(plain.cfg.n_layers):
        for hook in ["hook_attn_scores", "hook_pattern"]:
            name = f"blocks.{layer}.attn.{hook}"
            a, b = after[name].transpose(1, 2)[real], before[name].transpose(1, 2)[real]
            finite = torch.isfinite(b)
            torch.testing.assert_close(a[finite], b[finite], atol=TOL, rtol=0, msg=name)
        name = f"blocks.{layer}.hook_attn_out"
        torch.testing.assert_close(after[name][real], before[name][real], atol=TOL, rtol=0)
        q, k = after[f"blocks.{layer}.attn.hook_q"], after[f"blocks.{layer}.attn.hook_k"]
        assert not torch.allclose(q, before[f"blocks.{layer}.attn.hook_q"], atol=1e-3)
        qk_after = torch.einsum("bqhd,bkhd->bhqk", q, k)
        qk_before = torch.einsum("bqhd,bkhd->bhqk", before[f"blocks.{layer}.attn.hook_q"],
                                 before[f"blocks.{layer}.attn.hook_k"])  # fmt: skip
        torch.testing.assert_close(qk_after, qk_before, atol=1e-5, rtol=0)
    w_o = refactored.W_O.double()
    rows = torch.eye(w_o.shape[-2], dtype=torch.float64)
    torch.testing.assert_close(w_o @ w_o.mT, rows.expand_as(w_o @ w_o.mT), atol=1e-5, rtol=0)
    assert not refactored.b_V.any()
