"""Path patching: a plain hook-by-hook reference, a hand-built circuit, and the batched sweep."""

from __future__ import annotations

import inspect

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.patching import activation_patch, kl_to_clean, logit_diff
from mitk.analysis.patching.path import path_patch, path_patch_heads
from mitk.errors import ShapeMismatchError
from tests.checkpoints import padded_prompt_pairs


def last_position_logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3] - logits[:, -1, 8]


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    """3 layers with MLPs and grouped-query attention; weights scaled up so heads matter."""
    cfg = TransformerConfig(
        d_model=32, n_layers=3, n_heads=4, n_key_value_heads=2, d_vocab=40, n_ctx=16
    )
    model = HookedTransformer(cfg, seed=5)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.mul_(10)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % 40
    return clean, corrupted


def reference(model, base, source, senders, receivers, metric, mask=None):
    """Path patching written as plainly as possible: full forwards and one hook per activation."""
    cfg = model.cfg
    group = cfg.n_heads // cfg.n_key_value_heads
    with torch.no_grad():
        _, base_cache = model.run_with_cache(base, attention_mask=mask)
        _, source_cache = model.run_with_cache(source, attention_mask=mask)

        def freeze_z(z, hook):
            layer = int(hook.name.split(".")[1])
            z = base_cache[hook.name].clone()
            for s_layer, s_head in senders:
                if s_layer == layer:
                    z[:, :, s_head] = source_cache[hook.name][:, :, s_head]
            return z

        def freeze_mlp(out, hook):
            return base_cache[hook.name]

        seen = {}

        def keep(act, hook):
            seen[hook.name] = act.clone()

        hooks = [(f"blocks.{layer}.attn.hook_z", freeze_z) for layer in range(cfg.n_layers)]
        if cfg.has_mlp:
            hooks += [(f"blocks.{layer}.hook_mlp_out", freeze_mlp) for layer in range(cfg.n_layers)]
        if receivers != "logits":
            hooks += [(f"blocks.{layer}.attn.hook_{c}", keep) for layer, _, c in receivers]
        logits = model.run_with_hooks(base, attention_mask=mask, fwd_hooks=hooks)
        if receivers == "logits":
            return metric(logits)

        def patch(act, hook):
            act = act.clone()
            for layer, head, channel in receivers:
                if hook.name == f"blocks.{layer}.attn.hook_{channel}":
                    index = head if channel == "q" else head // group
                    act[:, :, index] = seen[hook.name][:, :, index]
            return act

        names = {f"blocks.{layer}.attn.hook_{c}" for layer, _, c in receivers}
        return metric(
            model.run_with_hooks(
                base, attention_mask=mask, fwd_hooks=[(n, patch) for n in sorted(names)]
            )
        )


CASES = [
    ([(0, 1)], [(2, 1, "q")]),
    ([(0, 1)], [(2, 3, "k"), (2, 0, "v")]),  # kv heads 1 and 0 under GQA
    ([(0, 0), (0, 3)], [(1, 2, "v"), (2, 0, "q"), (2, 1, "k")]),
    ([(0, 2), (1, 3)], [(2, 2, "k")]),
    ([(1, 0)], "logits"),
    ([(0, 1), (2, 3)], "logits"),
]


@pytest.mark.parametrize(("senders", "receivers"), CASES)
def test_equals_plain_reference(model, pair, senders, receivers) -> None:
    clean, corrupted = pair
    got = path_patch(model, clean, corrupted, logit_diff(3, 8), senders, receivers)
    want = reference(model, corrupted, clean, senders, receivers, last_position_logit_diff)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = last_position_logit_diff(model(corrupted))
    assert (got - base).abs().max() > 1e-3  # the path carries a real effect
    # a plain callable on full logits gives the same numbers
    full = path_patch(model, clean, corrupted, last_position_logit_diff, senders, receivers)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=0)


def test_noising_runs_clean_with_corrupted_senders(model, pair) -> None:
    clean, corrupted = pair
    for receivers in ([(2, 0, "q"), (2, 3, "v")], "logits"):
        got = path_patch(
            model,
            clean,
            corrupted,
            logit_diff(3, 8),
            [(0, 2), (1, 1)],
            receivers,
            direction="noising",
        )
        want = reference(
            model, clean, corrupted, [(0, 2), (1, 1)], receivers, last_position_logit_diff
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --- a hand-built circuit where the answer is known ------------------------------------------

S = slice(0, 4)  # the residual subspace layer-0 head 0 writes into


@pytest.fixture(scope="module")
def circuit() -> HookedTransformer:
    """L0H0 writes only into S; L1H0 reads S only through its keys; L1H1 and W_U never read S.

    RMSNorm with a huge epsilon and weight 2**20 is exactly the identity in fp32
    (``mean(x²) + 2**40`` rounds to ``2**40``), so no norm couples S to other directions.
    """
    cfg = TransformerConfig(
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_vocab=20,
        n_ctx=16,
        d_mlp=0,
        normalization="rmsnorm",
        norm_eps=2.0**40,
    )
    model = HookedTransformer(cfg, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2**20 if param.ndim == 1 else 25)  # 1-D: norm weights (biases are 0)
        model.blocks[0].attn.W_O[0][:, 4:] = 0
        model.blocks[1].attn.W_Q[0][S] = 0
        model.blocks[1].attn.W_V[0][S] = 0
        for weight in ("W_Q", "W_K", "W_V"):
            getattr(model.blocks[1].attn, weight)[1][S] = 0
        model.unembed.W_U[S] = 0
    x = torch.randn(2, 5, 16)
    assert torch.equal(model.ln_final(x), x)
    return model


@pytest.fixture(scope="module")
def circuit_pair() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 7) % 20
    return clean, corrupted


def test_hand_built_circuit(circuit, circuit_pair) -> None:
    clean, corrupted = circuit_pair
    metric = logit_diff(2, 5)
    full = activation_patch(circuit, clean, corrupted, metric, "z", "head", layers=[0])
    base = full.corrupted
    total = full.per_prompt[:, 0, 0]
    assert (total - base).abs().max() > 5e-2  # the corruption reaches the metric through L0H0

    def pp(receivers):
        return path_patch(circuit, clean, corrupted, metric, [(0, 0)], receivers)

    torch.testing.assert_close(pp([(1, 0, "k")]), total, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        pp([(1, 0, "q"), (1, 0, "k"), (1, 0, "v")]), total, atol=1e-5, rtol=0
    )
    for receivers in (
        [(1, 0, "q")],
        [(1, 0, "v")],
        [(1, 1, "q")],
        [(1, 1, "k")],
        [(1, 1, "v")],
        "logits",
    ):
        torch.testing.assert_close(pp(receivers), base, atol=1e-6, rtol=0)
    # the sweep finds the same: L0H0 -> L1H0.k is the whole effect, L0H0 -> logits is none
    sweep = path_patch_heads(circuit, clean, corrupted, metric, [(1, 0, "k")])
    torch.testing.assert_close(sweep.per_prompt[:, 0, 0], total, atol=1e-5, rtol=0)
    direct = path_patch_heads(circuit, clean, corrupted, metric, "logits")
    torch.testing.assert_close(direct.per_prompt[:, 0, 0], base, atol=1e-6, rtol=0)


def test_last_layer_senders_to_logits_equal_activation_patching(circuit, circuit_pair) -> None:
    """The last layer's heads reach the logits only directly, so both interventions agree."""
    clean, corrupted = circuit_pair
    for metric in (logit_diff(2, 5), kl_to_clean()):
        joint = activation_patch(circuit, clean, corrupted, metric, "z", "layer", layers=[1])
        got = path_patch(circuit, clean, corrupted, metric, [(1, 0), (1, 1)], "logits")
        torch.testing.assert_close(got, joint.per_prompt[:, 0], atol=1e-5, rtol=0)
        assert (got - joint.corrupted).abs().max() > 1e-3


# --- the sweep -------------------------------------------------------------------------------


@pytest.mark.parametrize("receivers", [[(2, 1, "k"), (2, 2, "q")], [(1, 3, "v")], "logits"])
def test_sweep_equals_one_sender_at_a_time(model, pair, receivers) -> None:
    clean, corrupted = pair
    metric = logit_diff(3, 8)
    result = path_patch_heads(model, clean, corrupted, metric, receivers)
    last = 3 if receivers == "logits" else receivers[0][0]
    assert result.per_prompt.shape == (2, 3, 4)
    assert result.eligible.sum() == 4 * last and result.eligible[:last].all()
    for layer in range(3):
        for head in range(4):
            if layer < last:
                want = path_patch(model, clean, corrupted, metric, [(layer, head)], receivers)
            else:  # heads that cannot be senders hold the base (corrupted) metric
                want = result.corrupted
            torch.testing.assert_close(result.per_prompt[:, layer, head], want, atol=1e-5, rtol=0)
    for kwargs in ({"batch_variants": False}, {"memory_budget_gb": 1e-6}):
        other = path_patch_heads(model, clean, corrupted, metric, receivers, **kwargs)
        torch.testing.assert_close(other.per_prompt, result.per_prompt, atol=1e-5, rtol=0)


def test_sweep_batches_variants(model, pair) -> None:
    clean, corrupted = pair
    rows: list[int] = []
    counter = ("blocks.2.hook_resid_pre", lambda act, hook: rows.append(act.shape[0]))
    with model.hooks(fwd_hooks=[counter]):
        path_patch_heads(model, clean, corrupted, logit_diff(3, 8), "logits")
    assert rows == [2, 2, 12 * 2]  # clean, corrupted, then all 12 senders in one forward


def test_result_baselines_normalisation_and_frame(model, pair) -> None:
    clean, corrupted = pair
    result = path_patch_heads(model, clean, corrupted, logit_diff(3, 8), [(2, 0, "v")])
    with torch.no_grad():
        torch.testing.assert_close(result.clean, last_position_logit_diff(model(clean)))
        torch.testing.assert_close(result.corrupted, last_position_logit_diff(model(corrupted)))
    assert result.values.shape == (3, 4)
    norm = result.normalized()
    torch.testing.assert_close(norm[2], torch.zeros(4), atol=1e-5, rtol=0)  # ineligible layer
    expected = (result.values - result.corrupted.mean()) / (
        result.clean.mean() - result.corrupted.mean()
    )
    torch.testing.assert_close(norm, expected)
    frame = result.to_frame()
    assert len(frame) == 12 and list(frame["layer"][:5]) == [0, 0, 0, 0, 1]
    assert list(frame["head"][:5]) == [0, 1, 2, 3, 0]
    assert frame["eligible"].sum() == 8 and set(frame["receivers"]) == {"L2H0.v"}
    torch.testing.assert_close(
        torch.tensor(frame["value"].to_numpy()).float(), result.values.reshape(-1)
    )


def test_padded_batch_equals_prompts_one_at_a_time(model) -> None:
    lengths = [8, 5, 6]
    clean, corrupted, mask, last = padded_prompt_pairs(tuple(lengths))
    answers, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    receivers = [(1, 2, "k"), (2, 0, "q")]
    metric = logit_diff(answers, wrong, pos=last)
    single = path_patch(model, clean, corrupted, metric, [(0, 3)], receivers, attention_mask=mask)
    sweep = path_patch_heads(model, clean, corrupted, metric, receivers, attention_mask=mask)
    for row, n in enumerate(lengths):
        alone = (clean[row : row + 1, :n], corrupted[row : row + 1, :n])
        one = logit_diff(answers[row], wrong[row])
        want = path_patch(model, *alone, one, [(0, 3)], receivers)
        torch.testing.assert_close(single[row : row + 1], want, atol=1e-5, rtol=0)
        want_sweep = path_patch_heads(model, *alone, one, receivers)
        torch.testing.assert_close(
            sweep.per_prompt[row], want_sweep.per_prompt[0], atol=1e-5, rtol=0
        )


def test_bad_inputs(model, pair) -> None:
    clean, corrupted = pair
    metric = logit_diff(3, 8)
    # at test time the shared "batch pos" annotation rejects these first (a TypeError); the
    # unwrapped function shows what callers get without runtime type checks
    unchecked = inspect.unwrap(path_patch)
    short, narrow_mask = corrupted[:, :5], torch.ones(2, 3, dtype=torch.long)
    with pytest.raises((ShapeMismatchError, TypeError), match=r"same|pos"):
        path_patch(model, clean, short, metric, [(0, 0)], "logits")
    with pytest.raises(ShapeMismatchError, match="same"):
        unchecked(model, clean, short, metric, [(0, 0)], "logits")
    with pytest.raises(ShapeMismatchError, match="attention_mask"):
        unchecked(model, clean, corrupted, metric, [(0, 0)], "logits", attention_mask=narrow_mask)
    with pytest.raises(ShapeMismatchError, match="same"):
        inspect.unwrap(path_patch_heads)(model, clean, corrupted[:, :5], metric, "logits")
    with pytest.raises(ValueError, match="channel"):
        path_patch(model, clean, corrupted, metric, [(0, 0)], [(2, 0, "o")])
    with pytest.raises(ValueError, match="channel"):
        path_patch_heads(model, clean, corrupted, metric, [(2, 0, "z")])
    with pytest.raises(ValueError, match="'logits'"):
        path_patch(model, clean, corrupted, metric, [(0, 0)], "logit")
    with pytest.raises(ValueError, match="outside"):
        path_patch(model, clean, corrupted, metric, [(0, 4)], "logits")
    with pytest.raises(ValueError, match="outside"):
        path_patch(model, clean, corrupted, metric, [(0, 0)], [(3, 0, "q")])
    with pytest.raises(ValueError, match="not before"):
        path_patch(model, clean, corrupted, metric, [(1, 0)], [(1, 2, "q")])
    with pytest.raises(ValueError, match="not before"):
        path_patch(model, clean, corrupted, metric, [(0, 0), (2, 1)], [(1, 2, "q"), (2, 0, "k")])
    with pytest.raises(ValueError, match="empty"):
        path_patch(model, clean, corrupted, metric, [], "logits")
    with pytest.raises(ValueError, match="empty"):
        path_patch(model, clean, corrupted, metric, [(0, 0)], [])
    with pytest.raises((ValueError, TypeError), match="direction"):
        path_patch(model, clean, corrupted, metric, [(0, 0)], "logits", direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions for a batch"):
        path_patch(
            model,
            clean,
            corrupted,
            logit_diff(3, 8, pos=torch.tensor([1, 2, 3])),
            [(0, 0)],
            "logits",
        )
