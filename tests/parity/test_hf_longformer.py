"""mitk against Hugging Face ``LongformerModel``: sliding-window attention with global tokens.

A random tiny checkpoint with perturbed norms, windows of different widths per layer
(4 and 6 positions), a sequence several windows long that is not a multiple of the
window (Hugging Face pads it internally), right padding, and global tokens that differ
per row. ``return_type="hidden"`` must equal ``last_hidden_state`` at real tokens on
the fused (banded) and explicit paths; the explicit path's pattern must be Hugging
Face's attention probabilities, laid out densely; the fused path must never build a
``[pos, pos]`` tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
import torch

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.errors import ModelFileError, UnsupportedModelError
from tests.op_shapes import created_shapes, has_square

TOL = 1e-4
Shape = tuple[int, ...]
VOCAB, PAD = 97, 1


def _hf_config(**changes: object) -> object:
    from transformers import LongformerConfig

    return LongformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=160, attention_window=[4, 6],
                            **changes)  # fmt: skip


def _build() -> torch.nn.Module:
    """A random LongformerModel whose norms are not the identity (so a missing one shows)."""
    from transformers import LongformerModel

    hf = LongformerModel(_hf_config()).eval()
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, HookedTransformer]:
    torch.manual_seed(0)
    hf = _build()
    directory = tmp_path_factory.mktemp("longformer")
    hf.save_pretrained(directory, safe_serialization=True)
    assert (directory / "model.safetensors").exists()
    return hf, HookedTransformer.from_pretrained(directory)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four rows of 23 tokens (about 6 windows of 4) with globals: right padding to 17 and
    9 tokens, and left padding of 5 (RoBERTa's positions skip pad ids, as mitk's skip the mask).
    """
    tokens = torch.randint(3, VOCAB, (4, 23), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    mask[3, :5] = 0
    tokens[mask == 0] = PAD  # RoBERTa counts positions over the tokens that are not the pad id
    glob = torch.zeros_like(tokens)
    glob[0, [0, 11, 12]] = 1  # the first token, and two in the middle next to each other
    glob[1, 3] = 1
    glob[2, [0, 20]] = 1  # 20 is padding: never global (Hugging Face multiplies the masks)
    glob[3, [2, 5, 22]] = 1  # 2 is padding; 5 the first real token
    return tokens, mask, glob


@pytest.mark.parametrize("with_globals", [False, True], ids=["window-only", "global-tokens"])
def test_hidden_and_every_layer_match_hf_on_both_paths(
    tiny: tuple[torch.nn.Module, HookedTransformer], with_globals: bool
) -> None:
    hf, model = tiny
    tokens, mask, glob = _batch()
    glob_arg = glob if with_globals else None
    real = mask.bool()
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, global_attention_mask=glob_arg,
                 output_hidden_states=True)  # fmt: skip
        fused = model(tokens, attention_mask=mask, global_attention_mask=glob_arg,
                      return_type="hidden")  # fmt: skip
        paths = model.attention_paths()
        hidden, cache = model.run_with_cache(
            tokens, attention_mask=mask, global_attention_mask=glob_arg, return_type="hidden"
        )
        eager_paths = model.attention_paths()
    suffix = " + global tokens" if with_globals else ""
    assert paths == [f"sdpa: banded, window 4{suffix}", f"sdpa: banded, window 6{suffix}"]
    assert all(path.startswith("eager: hooked") for path in eager_paths)
    assert (fused - ref.last_hidden_state)[real].abs().max() < TOL
    assert (hidden - fused)[real].abs().max() < 1e-5
    for layer in range(model.cfg.n_layers):  # hidden_states[L] enters block L
        got = cache["resid_pre", layer]
        assert (got - ref.hidden_states[layer])[real].abs().max() < TOL, layer


def test_global_tokens_change_the_output_through_their_own_projections(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    """Without the global projections the global rows would be wrong: the test can fail."""
    _, model = tiny
    tokens, mask, glob = _batch()
    with torch.no_grad():
        plain = model(tokens, attention_mask=mask, return_type="hidden")
        globbed = model(tokens, attention_mask=mask, global_attention_mask=glob,
                        return_type="hidden")  # fmt: skip
        # a global token's query uses query_global: zeroing it changes that row only at layer 0
        _, cache = model.run_with_cache(tokens, attention_mask=mask, global_attention_mask=glob,
                                        names_filter=lambda n: n.endswith("hook_z"),
                                        return_type="hidden")  # fmt: skip
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_q_global", lambda q, hook: q * 0)]):
            _, zeroed = model.run_with_cache(
                tokens, attention_mask=mask, global_attention_mask=glob,
                names_filter="blocks.0.attn.hook_z", return_type="hidden",
            )  # fmt: skip
    assert (plain - globbed)[mask.bool()].abs().max() > 1e-2
    moved = (zeroed["z", 0] - cache["z", 0]).abs().amax((-1, -2)) > 1e-6  # [batch, pos]
    assert torch.equal(moved, (glob * mask).bool())


def _dense_hf_pattern(
    hf_out: object, layer: int, glob: torch.Tensor, window: int, n: int
) -> torch.Tensor:
    """Hugging Face's attention probabilities (band, global columns; global rows) as [q, k]."""
    local = hf_out.attentions[layer]  # [batch, head, pos, globals + 2 window + 1]
    batch, heads = local.shape[:2]
    n_glob = int(glob.sum(-1).max())
    dense = torch.zeros(batch, heads, n, n)
    for b in range(batch):
        where = glob[b].nonzero().flatten().tolist()
        for i in range(n):
            for t in range(2 * window + 1):
                j = i - window + t
                if 0 <= j < n:
                    dense[b, :, i, j] += local[b, :, i, n_glob + t]
            for slot, j in enumerate(where):
                dense[b, :, i, j] += local[b, :, i, slot]
        for slot, i in enumerate(where):  # [batch, head, padded pos, globals]
            dense[b, :, i] = hf_out.global_attentions[layer][b, :, :n, slot]
    return dense


def test_pattern_is_the_sparse_pattern_hf_uses(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    hf, model = tiny
    tokens, mask, glob = _batch()
    real = mask.bool()
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, global_attention_mask=glob, output_attentions=True)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, global_attention_mask=glob,
                                        names_filter=lambda n: n.endswith("hook_pattern"),
                                        return_type="hidden")  # fmt: skip
    glob = glob & mask
    n = tokens.shape[1]
    for layer, window in enumerate((2, 3)):
        pattern = cache["pattern", layer]
        rows = real[:, None, :]  # real queries; padded ones see only themselves
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        expected = _dense_hf_pattern(ref, layer, glob, window, n)
        diff = (pattern - expected).abs().amax(-1)[rows.expand_as(pattern[..., 0])]
        assert diff.max() < 1e-5, layer
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        outside = ((i - j).abs() > window) & ~glob[:, None, None, :].bool()
        outside = outside & ~glob[:, None, :, None].bool() & real[:, None, :, None]
        assert torch.all(pattern[outside.expand_as(pattern)] == 0)  # exact zeros off the band
        assert torch.all(pattern[(~real)[:, None, None, :].expand_as(pattern)
                                 & real[:, None, :, None].expand_as(pattern)] == 0)  # fmt: skip
        g_rows = pattern[0, :, 11]  # a global row sees every real key
        assert torch.all(g_rows > 0)


def _created(model: HookedTransformer, tokens: torch.Tensor, glob: torch.Tensor) -> list[Shape]:
    """Every tensor shape an operator returned during a fused forward (``tests.op_shapes``)."""
    with torch.no_grad():
        return created_shapes(
            lambda: model(tokens, global_attention_mask=glob, return_type="hidden")
        )


def test_fused_path_builds_no_pos_by_pos_tensor(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    """No tensor the forward creates has two axes as long as the sequence.

    With a pattern hook the explicit path runs and the same check finds the dense
    ``[batch, head, pos, pos]`` scores, so the check can fail.
    """
    _, model = tiny
    n = 150  # longer than every other axis (n_ctx 158; vocab 97; 3 * d_model 96)
    tokens = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(3))
    glob = torch.zeros_like(tokens)
    glob[0, [0, 30]] = 1

    def dense(shapes: list[Shape]) -> list[Shape]:
        return [s for s in shapes if sum(dim >= n for dim in s) >= 2]

    fused = _created(model, tokens, glob)
    assert not dense(fused) and not has_square(fused, n)
    assert model.attention_paths()[0].startswith("sdpa: banded")
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p)]):
        assert (1, 4, n, n) in dense(_created(model, tokens, glob))


def test_held_pattern_reproduces_the_run_and_heads_sum_to_attn_out(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    """Holding each layer's pattern (a linearised run) mixes global rows with v_global too."""
    _, model = tiny
    tokens, mask, glob = _batch()
    real = mask.bool()
    with torch.no_grad():
        hidden, cache = model.run_with_cache(
            tokens, attention_mask=mask, global_attention_mask=glob, return_type="hidden"
        )
        held = {f"blocks.{L}.attn.hook_pattern": cache["pattern", L] for L in range(2)}
        again = model(tokens, attention_mask=mask, global_attention_mask=glob,
                      return_type="hidden", hold=held)  # fmt: skip
        for layer in range(model.cfg.n_layers):
            # per-head writes z @ W_O (global rows included) plus b_O are the attention's output
            attn = model.blocks[layer].attn
            heads = torch.einsum("bphd,hdm->bphm", cache["z", layer], attn.W_O)
            torch.testing.assert_close(heads.sum(2) + attn.b_O, cache["attn_out", layer],
                                       atol=1e-5, rtol=0)  # fmt: skip
    assert (again - hidden)[real].abs().max() < 1e-5


def test_bare_encoder_refusals_as_for_bert(tiny: tuple[torch.nn.Module, HookedTransformer]) -> None:
    _, model = tiny
    tokens, mask, glob = _batch()
    with pytest.raises(UnsupportedModelError, match="no LM head"):
        model(tokens, attention_mask=mask, global_attention_mask=glob)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="hidden")
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        logit_attribution(model, cache, answer_tokens=1)
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        model.process_weights(center_writing_weights=True)
    with pytest.raises(UnsupportedModelError, match="W_qkv_global"):
        model.process_weights(fold_ln=True)


def test_global_attention_mask_is_checked(tiny: tuple[torch.nn.Module, HookedTransformer]) -> None:
    _, model = tiny
    tokens, mask, glob = _batch()
    with pytest.raises(Exception, match="global_attention_mask has shape"):
        model(tokens, attention_mask=mask, global_attention_mask=glob[:, :5], return_type="hidden")
    with pytest.raises(Exception, match="only 0"):
        model(tokens, attention_mask=mask, global_attention_mask=glob * 2, return_type="hidden")
    dense = HookedTransformer.from_pretrained(_bert_like())
    with pytest.raises(ValueError, match="no Longformer attention"):
        dense(tokens, global_attention_mask=glob, return_type="hidden")


def _bert_like() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=32))  # fmt: skip


def test_unknown_field_and_wrong_weight_shape_are_refused(tmp_path: Path) -> None:
    import json

    torch.manual_seed(0)
    _build().save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "made_up_switch": True}))
    with pytest.raises(UnsupportedModelError, match="made_up_switch"):
        HookedTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    key = next(k for k in weights if k.endswith("layer.1.attention.self.key_global.weight"))
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError):
        HookedTransformer.from_pretrained(tmp_path)


def test_global_weight_views_are_hf_projections(
    tiny: tuple[torch.nn.Module, HookedTransformer],
) -> None:
    hf, model = tiny
    attn, ref = model.blocks[1].attn, hf.encoder.layer[1].attention.self
    for which in ("Q", "K", "V"):
        linear = getattr(ref, {"Q": "query", "K": "key", "V": "value"}[which] + "_global")
        weight = getattr(attn, f"W_{which}_global")  # [head, d_model, d_head]
        torch.testing.assert_close(weight.permute(1, 0, 2).flatten(1), linear.weight.T)
        torch.testing.assert_close(getattr(attn, f"b_{which}_global").flatten(), linear.bias)
