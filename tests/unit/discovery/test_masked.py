"""Masked-run identities: nothing ablated is the clean run, everything ablated the ablated run."""

from __future__ import annotations

from jaxtyping import TypeCheckError
import pytest
import torch

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.discovery import Circuit, EdgeGraph, Prompts, faithfulness
from mitk.analysis.discovery.masked import MaskedRun
from mitk.config import RWKVConfig, SSMConfig
from mitk.errors import UnsupportedModelError
from tests.unit.discovery.models import LastLogit, random_pair, tiny

KINDS = ("mha", "gqa", "parallel", "attn_only")


def _logits(run: MaskedRun, keep: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run.logits(keep)[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_ablating_no_edge_is_the_clean_run(kind: str, ablation: str) -> None:
    model, prompts = tiny(kind), random_pair()
    run = MaskedRun(model, EdgeGraph.of(model), prompts, LastLogit(), ablation)
    with torch.no_grad():
        clean = model(prompts.clean)
    torch.testing.assert_close(_logits(run, run.keep_all(1.0)), clean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_ablating_every_edge_into_the_logits_is_the_ablated_run(kind: str) -> None:
    model, prompts = tiny(kind), random_pair()
    graph = EdgeGraph.of(model)
    keep = torch.ones(1, *graph.present.shape)
    keep[0, :, graph.receivers.index("logits")] = 0.0
    resample = MaskedRun(model, graph, prompts, LastLogit(), "resample")
    with torch.no_grad():
        corrupted = model(prompts.corrupted)
    torch.testing.assert_close(_logits(resample, keep), corrupted, atol=1e-5, rtol=0)
    # mean ablation: the logits read the mean of the corrupted runs' final residual streams
    mean = MaskedRun(model, graph, prompts, LastLogit(), "mean")
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.corrupted)
        final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].mean(0, keepdim=True)
        expected = model.unembed(model.ln_final(final)).expand(prompts.clean.shape[0], -1, -1)
    torch.testing.assert_close(_logits(mean, keep), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_ablating_every_edge_with_resampling_is_the_corrupted_run(kind: str) -> None:
    model, prompts = tiny(kind), random_pair()
    run = MaskedRun(model, EdgeGraph.of(model), prompts, LastLogit(), "resample")
    with torch.no_grad():
        corrupted = model(prompts.corrupted)
    torch.testing.assert_close(_logits(run, run.keep_all(0.0)), corrupted, atol=1e-5, rtol=0)


def test_masks_in_one_batch_equal_masks_run_alone() -> None:
    model, prompts = tiny("gqa"), random_pair()
    graph = EdgeGraph.of(model)
    run = MaskedRun(model, graph, prompts, LastLogit(), "mean")
    masks = torch.stack([Circuit.random(graph, n, seed=n).mask() for n in (5, 40, 120)])
    together = run.chunked(run.metric, masks)
    alone = torch.cat([run.chunked(run.metric, m[None]) for m in masks])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_a_mask_at_every_position_equals_the_plain_mask() -> None:
    model, prompts = tiny("mha"), random_pair()
    graph = EdgeGraph.of(model)
    run = MaskedRun(model, graph, prompts, LastLogit(), "resample")
    plain = Circuit.random(graph, 50, seed=1).mask()
    positional = plain.expand(prompts.clean.shape[1], *plain.shape)
    torch.testing.assert_close(
        _logits(run, positional[None]), _logits(run, plain[None]), atol=1e-6, rtol=0
    )


def test_an_edge_at_one_position_changes_only_that_position_and_later() -> None:
    model, prompts = tiny("mha"), random_pair()
    graph = EdgeGraph.of(model)
    run = MaskedRun(model, graph, prompts, LastLogit(), "resample")
    keep = torch.ones(1, prompts.clean.shape[1], *graph.present.shape)
    keep[0, 4, graph.senders.index("embed"), graph.receivers.index("L0H1.v")] = 0.0
    changed = (_logits(run, keep) - _logits(run, run.keep_all(1.0))).abs().amax((0, 2))
    assert (changed[:4] == 0).all() and changed[4:].max() > 0


def test_layer_circuit_runs_as_its_head_level_expansion() -> None:
    model, prompts = tiny("mha"), random_pair()
    layers = Circuit.of(
        model, [("embed", "L0_attn"), ("L0_attn", "L2_mlp"), ("L2_mlp", "logits")], "layers"
    )
    heads = EdgeGraph.of(model)
    fine = layers.graph.fine_mask(layers.mask())
    as_heads = Circuit.from_mask(heads, fine > 0)
    a = faithfulness(model, layers, prompts, LastLogit(), "mean")
    b = faithfulness(model, as_heads, prompts, LastLogit(), "mean")
    torch.testing.assert_close(a.circuit, b.circuit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_faithfulness_of_the_full_and_empty_circuits(ablation: str) -> None:
    model, prompts = tiny("mha"), random_pair()
    graph = EdgeGraph.of(model)
    full = faithfulness(model, Circuit.full(graph), prompts, LastLogit(), ablation)
    assert full.recovered == pytest.approx(
        1.0, abs=1e-4
    ) and full.random_recovered == pytest.approx(1.0, abs=1e-4)
    empty = faithfulness(model, Circuit.of(model), prompts, LastLogit(), ablation)
    assert empty.recovered == pytest.approx(0.0, abs=1e-4) and empty.n_edges == 0


def test_clean_tokens_alone_resample_from_the_neighbouring_prompt() -> None:
    model, prompts = tiny("mha"), random_pair()
    run = MaskedRun(model, EdgeGraph.of(model), prompts.clean, LastLogit(), "resample")
    with torch.no_grad():
        rolled = model(prompts.clean.roll(1, 0))
    torch.testing.assert_close(_logits(run, run.keep_all(0.0)), rolled, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="batch of 2"):
        MaskedRun(model, EdgeGraph.of(model), prompts.clean[:1], LastLogit(), "resample")
    # the test-time type checker refuses the Literal first; users' runs get the ValueError
    with pytest.raises((ValueError, TypeCheckError), match=r"ablation must be|'noise'"):
        MaskedRun(model, EdgeGraph.of(model), prompts, LastLogit(), "noise")  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeCheckError), match=r"must match|corrupted"):
        Prompts(prompts.clean, prompts.corrupted[:, :3])


def test_post_norm_models_are_refused() -> None:
    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=40, n_ctx=16, norm_position="post"
    )
    with pytest.raises(UnsupportedModelError):
        EdgeGraph.of(HookedTransformer(cfg, seed=0))


@pytest.mark.parametrize("mixer", ["mamba", "mamba-hybrid", "rwkv"])
def test_models_with_recurrent_mixers_are_refused_by_name(mixer: str) -> None:
    base: dict = dict(d_model=16, n_layers=2, n_heads=2, d_vocab=40, n_ctx=16, d_mlp=32,
                      positional="none")  # fmt: skip
    if mixer == "rwkv":
        cfg = TransformerConfig(**base, rwkv=RWKVConfig(d_attn=16))
    else:
        layers = [1] if mixer == "mamba-hybrid" else None
        ssm = SSMConfig(d_inner=32, d_state=4, d_conv=4, dt_rank=2, layers=layers)
        cfg = TransformerConfig(**base, normalization="rmsnorm", ssm=ssm)
    layers = r"\[1\]" if mixer == "mamba-hybrid" else r"\[0, 1\]"
    with pytest.raises(UnsupportedModelError, match=f"layers {layers} are recurrent.*mixer_out"):
        EdgeGraph.of(HookedTransformer(cfg, seed=0))


def _spare_below(graph: EdgeGraph, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """``mask`` with every edge into a receiver below ``layer`` kept."""
    spared = mask.clone()
    below = [r for r, node in enumerate(graph.fine_receivers) if node.layer < layer]
    spared[..., below] = 1.0
    return spared


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ablation", ["mean", "resample"])
@pytest.mark.parametrize("positional", [False, True])
def test_starting_at_the_first_changed_block_changes_nothing(
    kind: str, ablation: str, positional: bool
) -> None:
    """Masks that ablate nothing below block L run from L on the clean stream, same logits."""
    model, prompts = tiny(kind), random_pair()
    graph = EdgeGraph.of(model).fine
    fast = MaskedRun(model, graph, prompts, LastLogit(), ablation)
    slow = MaskedRun(model, graph, prompts, LastLogit(), ablation, reuse_clean_prefix=False)
    gen = torch.Generator().manual_seed(7)
    for layer in range(1, model.cfg.n_layers + 1):
        shape = (3, prompts.clean.shape[1], *graph.present.shape) if positional else (
            3, *graph.present.shape)  # fmt: skip
        keep = _spare_below(graph, torch.rand(shape, generator=gen), layer)
        assert fast.first_changed_layer(keep) == min(layer, model.cfg.n_layers - 1)
        with torch.no_grad():
            together = fast.logits(keep), slow.logits(keep)
        torch.testing.assert_close(*together, atol=1e-5, rtol=0)
        assert slow.first_changed_layer(keep) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_layer_masks_without_gradients_equal_the_gradient_path(kind: str) -> None:
    """Without gradients a layer mask shares one input across a layer's heads and writes
    sender outputs into a buffer; with them every head reads its own input, from a list."""
    model, prompts = tiny(kind), random_pair()
    graph = EdgeGraph.of(model, "layers")
    run = MaskedRun(model, graph, prompts, LastLogit(), "resample")
    coarse = torch.stack([Circuit.random(graph, n, seed=n).mask() for n in (3, 9, 20)])
    keep = graph.fine_mask(coarse.float())
    with torch.no_grad():
        fast = run.logits(keep)
    with torch.enable_grad():
        slow = run.logits(keep.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
