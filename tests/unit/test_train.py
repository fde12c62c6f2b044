"""The small training loop: learning happens, resume is bit-identical, NaN stops the run."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import ShapeMismatchError
from mitk.sequences import periodic_segments, repeated_random_tokens
from mitk.train import NonFiniteLossError, TrainConfig, train_language_model
from mitk.train.schedule import warmup_cosine
from mitk.train.tied import tied_unembedding
from tests.interrupted import KilledError

CFG = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=24, d_mlp=32)


def batches(step: int) -> torch.Tensor:
    return periodic_segments(8, 24, 20, torch.Generator().manual_seed(step))


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    values = [warmup_cosine(s, total=100, warmup=10, floor=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert warmup_cosine(100, total=100, warmup=10, floor=0.1) == pytest.approx(0.1)


def test_loss_goes_down() -> None:
    model = HookedTransformer(CFG, seed=0)
    fixed = batches(0)  # one batch over and over: memorisable, so the loss must fall
    history = train_language_model(
        model,
        lambda step: fixed,
        TrainConfig(steps=60, lr=1e-2, warmup=5, log_every=10),
        progress=False,
    )
    assert history[-1]["loss"] < history[0]["loss"] - 0.3


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=12, lr=1e-2, warmup=3, checkpoint_every=4, log_every=2)
    straight = HookedTransformer(CFG, seed=0)
    train_language_model(straight, batches, cfg, progress=False)

    interrupted = HookedTransformer(CFG, seed=0)

    def dies_at_step_9(step: int) -> torch.Tensor:
        if step == 9:
            raise KeyboardInterrupt
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train_language_model(interrupted, dies_at_step_9, cfg, tmp_path, progress=False)
    resumed = HookedTransformer(CFG, seed=123)  # different init: everything must come from disk
    history = train_language_model(resumed, batches, cfg, tmp_path, resume=True, progress=False)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [h["step"] for h in history] == [2, 4, 6, 8, 10, 12]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = HookedTransformer(CFG, seed=0)
    cfg = TrainConfig(steps=8, lr=1e-2, warmup=1, checkpoint_every=2)
    poisoned = {"on": False}

    def poison_after_4(act: torch.Tensor, hook: object) -> torch.Tensor | None:
        return act * float("nan") if poisoned["on"] else None

    def batch_and_poison(step: int) -> torch.Tensor:
        poisoned["on"] = step >= 5
        return batches(step)

    with (
        model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", poison_after_4)]),
        pytest.raises(NonFiniteLossError, match="at step 5"),
    ):
        train_language_model(model, batch_and_poison, cfg, tmp_path, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fresh = HookedTransformer(CFG, seed=1)
    train_language_model(fresh, batches, TrainConfig(steps=4, checkpoint_every=2), tmp_path,
                         resume=True, progress=False)  # fmt: skip
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_probe_sequences_repeat_exactly() -> None:
    tokens = repeated_random_tokens(3, 7, 50, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 15) and (tokens[:, 0] == 0).all()
    assert torch.equal(tokens[:, 1:8], tokens[:, 8:])
    segs = periodic_segments(16, 40, 50, torch.Generator().manual_seed(0), max_period=9)
    assert segs.shape == (16, 40) and (segs[:, 1:] > 0).all()
    # every row repeats with some period <= 9 after BOS
    assert all(
        any(torch.equal(row[1 : 40 - p], row[1 + p :]) for p in range(4, 10)) for row in segs
    )
    with pytest.raises(ValueError, match="no period fits"):
        periodic_segments(1, 10, 50, torch.Generator(), min_period=8)


def test_tied_unembedding_is_one_parameter_inside_and_a_copy_after() -> None:
    model = HookedTransformer(CFG, seed=0)
    tokens = batches(0).clamp(max=CFG.d_vocab - 2)  # the last id never appears as input
    with tied_unembedding(model):
        names = dict(model.named_parameters())
        assert "unembed.W_U" not in names and "unembed.W_U" not in model.state_dict()
        logits = model(tokens)
        logits.logsumexp(-1).sum().backward()
        grad = model.embed.W_E.grad
        assert grad is not None and grad[-1].abs().sum() > 0  # reached only as the unembedding
        with torch.no_grad():
            model.embed.W_E.add_(1.0)
        assert not torch.allclose(model(tokens), logits)
        with torch.no_grad():
            model.embed.W_E.sub_(1.0)
    assert isinstance(model.unembed.W_U, torch.nn.Parameter)
    assert torch.equal(model.unembed.W_U, model.embed.W_E.T)
    assert model.unembed.W_U.data_ptr() != model.embed.W_E.data_ptr()  # untied: a copy
    assert torch.allclose(model(tokens), logits.detach(), atol=1e-5)


def test_tied_unembedding_unties_on_error_and_refuses_unequal_shapes() -> None:
    model = HookedTransformer(CFG, seed=0)
    with pytest.raises(KilledError), tied_unembedding(model):
        raise KilledError
    assert "unembed.W_U" in dict(model.named_parameters())
    model.unembed.W_U = torch.nn.Parameter(torch.zeros(CFG.d_model, CFG.d_vocab + 1))
    with pytest.raises(ShapeMismatchError, match="cannot tie W_U"), tied_unembedding(model):
        pass


def test_two_runs_are_bit_identical_with_threads_and_many_repeated_ids() -> None:
    # an embedding backward over more than ~1000 ids used to sum in thread order
    def run() -> list[torch.Tensor]:
        model = HookedTransformer(CFG, seed=0)
        train_language_model(
            model,
            lambda step: periodic_segments(96, 24, 20, torch.Generator().manual_seed(step)),
            TrainConfig(steps=3, lr=1e-2, warmup=1),
            progress=False,
        )
        return [p.detach().clone() for p in model.parameters()]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the order of the sums varied with 2 threads (xdist runs 1)
    try:
        assert all(torch.equal(a, b) for a, b in zip(run(), run(), strict=True))
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
