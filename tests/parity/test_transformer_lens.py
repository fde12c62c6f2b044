"""mitk against transformer-lens on the same GPT-2 checkpoint, hook by hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer

TOL = 1e-4
# The hooks both libraries expose for GPT-2 (per layer unless model-level).
MODEL_HOOKS = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
LAYER_HOOKS = [
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "mlp.hook_pre",
    "mlp.hook_post",
]


def _shared_hooks(n_layers: int) -> list[str]:
    per_layer = [f"blocks.{layer}.{h}" for layer in range(n_layers) for h in LAYER_HOOKS]
    return MODEL_HOOKS + per_layer


# transformer-lens 3.x deprecates its classic class in favour of the bridge; we still compare
# against it because it is what most published interpretability code ran on.
tl_deprecation = pytest.mark.filterwarnings(
    "ignore:HookedTransformer is deprecated:DeprecationWarning"
)


def _tl_hooked_transformer(gpt2_dir: Path):  # returns transformer_lens.HookedTransformer
    """transformer-lens's classic HookedTransformer on the same weights, built offline."""
    from transformer_lens import HookedTransformer as TLHookedTransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        default_prepend_bos=False,
    )
    model = TLHookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return model.eval()


def _compare(ours: dict, theirs: dict, names: list[str], batch_of: int) -> None:
    for hook in names:
        a, b = ours[hook], theirs[hook]
        if hook.endswith("hook_pos_embed") and b.shape[0] != batch_of:
            b = b.expand(batch_of, *b.shape[1:])
        if hook.endswith("hook_attn_scores"):
            finite = torch.isfinite(b) & (b > -1e4)  # TL may mask with a large negative
            a, b = a[finite], b[finite]
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda m, h=hook: f"{h}: {m}")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(7))


def test_every_shared_hook_matches_transformer_bridge(
    gpt2_dir: Path, gpt2: HookedTransformer, tokens: torch.Tensor
) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(gpt2_dir))
    names = _shared_hooks(gpt2.cfg.n_layers)
    with torch.no_grad():
        their_logits, theirs = bridge.run_with_cache(tokens)
        logits, ours = gpt2.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, their_logits, atol=TOL, rtol=0)
    _compare(ours, theirs, names, tokens.shape[0])


@tl_deprecation
def test_every_shared_hook_matches_tl_hooked_transformer(
    gpt2_dir: Path, gpt2: HookedTransformer, tokens: torch.Tensor
) -> None:
    tl = _tl_hooked_transformer(gpt2_dir)
    names = _shared_hooks(gpt2.cfg.n_layers)
    with torch.no_grad():
        their_logits, theirs = tl.run_with_cache(tokens)
        logits, ours = gpt2.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, their_logits, atol=TOL, rtol=0)
    _compare(ours, theirs, names, tokens.shape[0])


@tl_deprecation
def test_weight_properties_match_tl_shapes_and_values(
    gpt2_dir: Path, gpt2: HookedTransformer
) -> None:
    tl = _tl_hooked_transformer(gpt2_dir)
    for attr in ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
                 "W_in", "b_in", "W_out", "b_out", "W_U", "b_U"]:  # fmt: skip
        ours, theirs = getattr(gpt2, attr), getattr(tl, attr)
        assert ours.shape == theirs.shape, attr
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=attr)
