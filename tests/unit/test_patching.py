"""Batched activation patching equals a plain one-forward-per-variant loop, for every site."""

from __future__ import annotations

import inspect

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.patching import activation_patch, kl_to_clean, log_prob, logit_diff, prob
from mitk.errors import ShapeMismatchError, UnknownHookError
from tests.checkpoints import padded_prompt_pairs

# (pos axis, head axis) of each site's hooked activation, written out independently of mitk
AXES = {
    "resid_pre": (1, None), "resid_mid": (1, None), "resid_post": (1, None),
    "attn_out": (1, None), "mlp_out": (1, None), "post": (1, None),
    "z": (1, 2), "q": (1, 2), "k": (1, 2), "v": (1, 2), "pattern": (2, 1),
}  # fmt: skip
HOOK = {
    "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out", "post": "blocks.{}.mlp.hook_post",
    "z": "blocks.{}.attn.hook_z", "q": "blocks.{}.attn.hook_q", "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v", "pattern": "blocks.{}.attn.hook_pattern",
}  # fmt: skip


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = TransformerConfig(d_model=32, n_layers=3, n_heads=4, n_key_value_heads=2, d_vocab=40,
                            n_ctx=16)  # fmt: skip
    return HookedTransformer(cfg, seed=5)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % 40
    return clean, corrupted


def naive(model, clean, corrupted, metric, site, per, mask=None, direction="denoising"):
    """The reference: one run_with_hooks per variant, written as plainly as possible."""
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    pos_axis, head_axis = AXES[site]
    with torch.no_grad():
        _, cache = model.run_with_cache(source, attention_mask=mask)
        n_pos = clean.shape[1]
        results = []
        for layer in range(model.cfg.n_layers):
            hook = HOOK[site].format(layer)
            src = cache[hook]
            n_heads = src.shape[head_axis] if head_axis is not None else 1
            cells = {
                "layer": [(None, None)],
                "pos": [(p, None) for p in range(n_pos)],
                "head": [(None, h) for h in range(n_heads)],
                "head_pos": [(p, h) for h in range(n_heads) for p in range(n_pos)],
            }[per]
            row = []
            for pos, head in cells:
                index = [slice(None)] * src.ndim
                if pos is not None:
                    index[pos_axis] = pos
                if head is not None:
                    index[head_axis] = head

                def patch(act, hook, index=tuple(index), src=src):
                    act = act.clone()
                    act[index] = src[index]
                    return act

                logits = model.run_with_hooks(base, attention_mask=mask, fwd_hooks=[(hook, patch)])
                row.append(metric(logits))
            results.append(torch.stack(row, -1))
    return torch.stack(results, 1)  # [batch, layer, cells]


def last_position_logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3] - logits[:, -1, 8]


CASES = [(s, p) for s in AXES for p in ("layer", "pos", "head", "head_pos")
         if AXES[s][1] is not None or p in ("layer", "pos")]  # fmt: skip


@pytest.mark.parametrize(("site", "per"), CASES)
def test_batched_equals_naive_loop(model, pair, site: str, per: str) -> None:
    clean, corrupted = pair
    result = activation_patch(model, clean, corrupted, logit_diff(3, 8), site, per)
    expected = naive(model, clean, corrupted, last_position_logit_diff, site, per)
    assert result.per_prompt.reshape(expected.shape).shape == expected.shape
    torch.testing.assert_close(
        result.per_prompt.reshape(expected.shape), expected, atol=1e-5, rtol=0
    )
    assert result.values.shape == result.per_prompt.shape[1:]
    assert result.axes[0] == "layer" and len(result.axes) == result.values.ndim


def test_full_logit_callable_metric_and_noising(model, pair) -> None:
    clean, corrupted = pair
    result = activation_patch(model, clean, corrupted, last_position_logit_diff, "z", "head",
                              direction="noising")  # fmt: skip
    expected = naive(model, clean, corrupted, last_position_logit_diff, "z", "head",
                     direction="noising")  # fmt: skip
    torch.testing.assert_close(result.per_prompt, expected, atol=1e-5, rtol=0)


def test_baselines_and_normalisation(model, pair) -> None:
    clean, corrupted = pair
    result = activation_patch(model, clean, corrupted, logit_diff(3, 8), "resid_pre", "layer")
    with torch.no_grad():
        clean_ld = last_position_logit_diff(model(clean))
        corrupt_ld = last_position_logit_diff(model(corrupted))
    torch.testing.assert_close(result.clean, clean_ld)
    torch.testing.assert_close(result.corrupted, corrupt_ld)
    # patching the whole residual stream at layer 0 restores the clean run exactly
    torch.testing.assert_close(result.normalized()[0], torch.tensor(1.0), atol=1e-5, rtol=0)
    frame = result.to_frame()
    assert list(frame["layer"]) == [0, 1, 2] and {"value", "normalized"} <= set(frame.columns)


@pytest.mark.parametrize("make", [lambda: prob(3), lambda: log_prob(3), kl_to_clean])
def test_ready_made_metrics(model, pair, make) -> None:
    clean, corrupted = pair
    metric = make()
    result = activation_patch(model, clean, corrupted, metric, "attn_out", "pos")
    with torch.no_grad():
        clean_logits = model(clean)[:, -1]
    if metric.__class__.__name__ == "KLToClean":
        torch.testing.assert_close(result.clean, torch.zeros(2), atol=1e-6, rtol=0)
        assert (result.corrupted > 0).all()
        expected = naive(model, clean, corrupted,
                         lambda lg: (clean_logits.log_softmax(-1).exp() * (
                             clean_logits.log_softmax(-1) - lg[:, -1].log_softmax(-1))).sum(-1),
                         "attn_out", "pos")  # fmt: skip
    else:
        expected = naive(model, clean, corrupted, lambda lg: metric(lg[:, -1]), "attn_out", "pos")
    torch.testing.assert_close(result.per_prompt, expected, atol=1e-5, rtol=0)


def test_padded_batch_equals_pairs_one_at_a_time(model) -> None:
    lengths = [8, 5, 6]
    clean, corrupted, mask, last = padded_prompt_pairs(tuple(lengths))
    answers, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    batched = activation_patch(model, clean, corrupted, logit_diff(answers, wrong, pos=last),
                               "z", "head_pos", attention_mask=mask)  # fmt: skip
    for row, n in enumerate(lengths):
        alone = activation_patch(
            model, clean[row : row + 1, :n], corrupted[row : row + 1, :n],
            logit_diff(answers[row], wrong[row]), "z", "head_pos",
        )  # fmt: skip
        torch.testing.assert_close(batched.per_prompt[row, ..., :n], alone.per_prompt[0],
                                   atol=1e-5, rtol=0)  # fmt: skip
        # patching a padded position changes nothing
        padded = batched.per_prompt[row, ..., n:]
        torch.testing.assert_close(padded, batched.corrupted[row].expand_as(padded),
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_layers_before_the_patch_are_not_recomputed(model, pair) -> None:
    clean, corrupted = pair
    rows_seen: list[int] = []
    counter = ("blocks.0.hook_resid_pre", lambda act, hook: rows_seen.append(act.shape[0]))
    with model.hooks(fwd_hooks=[counter]):
        activation_patch(model, clean, corrupted, logit_diff(3, 8), "resid_pre", "pos", layers=[2])
    assert rows_seen == [2, 2]  # only the clean and corrupted baseline runs touch block 0


def test_small_memory_budget_chunks_without_changing_numbers(model, pair) -> None:
    clean, corrupted = pair
    big = activation_patch(model, clean, corrupted, logit_diff(3, 8), "z", "head_pos")
    tiny = activation_patch(model, clean, corrupted, logit_diff(3, 8), "z", "head_pos",
                            memory_budget_gb=1e-6)  # fmt: skip
    torch.testing.assert_close(big.per_prompt, tiny.per_prompt, atol=1e-6, rtol=0)


def test_bad_inputs(model, pair) -> None:
    clean, corrupted = pair
    metric = logit_diff(3, 8)
    with pytest.raises(UnknownHookError, match="did you mean 'resid_pre'"):
        activation_patch(model, clean, corrupted, metric, "resid_pr")
    with pytest.raises(ValueError, match="supports per="):
        activation_patch(model, clean, corrupted, metric, "resid_pre", "head")
    # at test time the shared "batch pos" annotation rejects it first (a TypeError); users,
    # and the unwrapped function, get the ShapeMismatchError
    with pytest.raises(TypeError, match="corrupted_tokens"):
        activation_patch(model, clean, corrupted[:, :5], metric)
    with pytest.raises(ShapeMismatchError, match="same"):
        inspect.unwrap(activation_patch)(model, clean, corrupted[:, :5], metric)
    with pytest.raises((ValueError, TypeError), match="direction"):
        activation_patch(model, clean, corrupted, metric, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers"):
        activation_patch(model, clean, corrupted, metric, layers=[5])
    with pytest.raises(ValueError, match="positions for a batch"):
        activation_patch(model, clean, corrupted, logit_diff(3, 8, pos=torch.tensor([1, 2, 3])))


def test_merged_start_groups_give_the_same_numbers(model, pair, monkeypatch) -> None:
    """Starting a variant earlier than its first changed position must not change its result."""
    import mitk.analysis.patching.engine as engine

    clean, corrupted = pair
    monkeypatch.setattr(engine, "MIN_TOKENS_PER_FORWARD", 1)  # one forward per start position
    separate = activation_patch(model, clean, corrupted, logit_diff(3, 8), "resid_pre", "pos")
    monkeypatch.setattr(engine, "MIN_TOKENS_PER_FORWARD", 10**9)  # everything in one bucket
    merged = activation_patch(model, clean, corrupted, logit_diff(3, 8), "resid_pre", "pos")
    torch.testing.assert_close(merged.per_prompt, separate.per_prompt, atol=1e-5, rtol=0)
    expected = naive(model, clean, corrupted, last_position_logit_diff, "resid_pre", "pos")
    torch.testing.assert_close(separate.per_prompt, expected, atol=1e-5, rtol=0)
    assert engine.merge_small_groups({0: [1], 3: [2, 3], 5: [4]}, 1, 6) == [(0, [1, 2, 3, 4])]
    assert engine.merge_small_groups({0: [1], 3: [2]}, 1, 6) == [(0, [1, 2])]
    monkeypatch.setattr(engine, "MIN_TOKENS_PER_FORWARD", 1)  # never merge
    assert engine.merge_small_groups({0: [1], 3: [2]}, 1, 6) == [(0, [1]), (3, [2])]
