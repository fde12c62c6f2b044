"""EAP-IG: one step equals a slow per-edge gradient x difference; many steps add up to the total."""

from __future__ import annotations

from jaxtyping import TypeCheckError
import pytest
import torch
from torch import Tensor

from mitk import HookedTransformer
from mitk.analysis.discovery import Circuit, EdgeGraph, Prompts, eap_ig
from tests.unit.discovery.models import LastLogit, random_pair, tiny


def _sender_writes(model: HookedTransformer, tokens: Tensor) -> dict[str, Tensor]:
    """Each sender's write on a plain run, from the cache (independently of the masked run)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    writes = {"embed": cache["blocks.0.hook_resid_pre"]}
    for L, block in enumerate(model.blocks):
        z = cache[f"blocks.{L}.attn.hook_z"]
        for h in range(model.cfg.n_heads):
            writes[f"L{L}H{h}"] = z[:, :, h] @ block.attn.W_O[h]
        if model.cfg.has_mlp:
            writes[f"L{L}_mlp"] = cache[f"blocks.{L}.hook_mlp_out"]
    return writes


def _norm_vjp(norm: torch.nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(norm(x), x, grad_out)
    return grad


def _receiver_gradient(model: HookedTransformer, tokens: Tensor, metric, receiver: str) -> Tensor:
    """d metric / d (receiver's input stream), from one forward and backward of the plain model."""
    grads: dict[str, Tensor] = {}
    n = model.cfg.n_layers
    if receiver == "logits":
        hook = f"blocks.{n - 1}.hook_resid_post"
    else:
        node, _, channel = receiver.partition(".")
        layer = int(node[1:].split("H")[0].split("_")[0])
        hook = f"blocks.{layer}.attn.hook_{channel}" if channel else f"blocks.{layer}.mlp.hook_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens, bwd_hooks=[(hook, lambda g, h: grads.__setitem__("g", g.detach()))]
        )
        metric(logits).sum().backward()
    model.zero_grad(set_to_none=True)
    grad = grads["g"]
    if receiver == "logits":
        return grad
    block = model.blocks[layer]
    if not channel:  # d/d mlp input, then back through ln2 at resid_mid
        return _norm_vjp(
            block.ln2, cache[f"blocks.{layer}.hook_resid_mid"], grad @ block.mlp.W_in.T
        )
    head = int(node.split("H")[1])
    W = {"q": block.attn.W_Q, "k": block.attn.W_K, "v": block.attn.W_V}[channel]
    return _norm_vjp(
        block.ln1, cache[f"blocks.{layer}.hook_resid_pre"], grad[:, :, head] @ W[head].T
    )


def test_one_step_equals_a_naive_per_edge_gradient_times_difference() -> None:
    model, prompts, metric = tiny("mha"), random_pair(), LastLogit(3)
    graph = EdgeGraph.of(model)
    clean, corrupted = (
        _sender_writes(model, prompts.clean),
        _sender_writes(model, prompts.corrupted),
    )
    gradients = {r: _receiver_gradient(model, prompts.clean, metric, r) for r in graph.receivers}
    batch = prompts.clean.shape[0]
    naive = torch.full(graph.present.shape, float("nan"))
    for sender, receiver in graph.edges():  # one edge at a time, as slowly as it reads
        delta = clean[sender] - corrupted[sender]
        s, r = graph.edge_index(sender, receiver)
        naive[s, r] = (delta * gradients[receiver]).sum() / batch
    for on in ("inputs", "activations"):
        result = eap_ig(model, prompts, metric, ig_steps=1, on=on, ablation="resample")
        torch.testing.assert_close(result.scores, naive, atol=1e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("kind", ["attn_only", "gqa"])
def test_integrated_gradients_on_activations_add_up_to_the_total_effect(kind: str) -> None:
    model, prompts, metric = tiny(kind), random_pair(), LastLogit(3)
    result = eap_ig(model, prompts, metric, ig_steps=40, on="activations", ablation="resample")
    with torch.no_grad():
        total = (metric(model(prompts.clean)) - metric(model(prompts.corrupted))).mean()
    # the right Riemann sum's error shrinks as 1 / ig_steps
    assert float(result.scores.nansum()) == pytest.approx(float(total), rel=0.05, abs=0.02)


def test_more_integration_steps_change_the_inputs_scores() -> None:
    model, prompts, metric = tiny("mha"), random_pair(), LastLogit(3)
    one = eap_ig(model, prompts, metric, ig_steps=1, on="inputs")
    five = eap_ig(model, prompts, metric, ig_steps=5, on="inputs")
    assert not torch.allclose(one.scores.nan_to_num(), five.scores.nan_to_num())


def test_grouped_query_attention_scores_per_key_value_group_and_per_layer() -> None:
    model, prompts, metric = tiny("gqa"), random_pair(), LastLogit(3)
    heads = eap_ig(model, prompts, metric, ig_steps=2, n_edges=10)
    layers = eap_ig(model, prompts, metric, ig_steps=2, granularity="layers", n_edges=3)
    assert "L1KV1.k" in heads.graph.receivers and len(heads.circuit) == 10
    # a layer edge's score is the sum of its head-level edges' scores
    s, r = layers.graph.edge_index("L0_attn", "L1_attn")
    hs = [i for i, n in enumerate(heads.graph.senders) if n.startswith("L0H")]
    hr = [i for i, n in enumerate(heads.graph.receivers) if n.startswith("L1") and "." in n]
    expected = heads.scores[hs][:, hr].nansum()
    torch.testing.assert_close(layers.scores[s, r], expected, atol=1e-5, rtol=1e-4)
    frame = layers.to_frame()
    assert frame["in_circuit"].sum() == 3 and frame["score"].abs().is_monotonic_decreasing


def test_bad_arguments_are_refused() -> None:
    model, prompts = tiny("mha"), random_pair()
    with pytest.raises(ValueError, match="ig_steps"):
        eap_ig(model, prompts, LastLogit(), ig_steps=0)
    # the test-time type checker refuses the Literal first; users' runs get the ValueError
    with pytest.raises((ValueError, TypeCheckError), match=r"on must be|'weights'"):
        eap_ig(model, prompts, LastLogit(), on="weights")  # type: ignore[arg-type]
    assert isinstance(prompts, Prompts)


@pytest.mark.parametrize("kind", ["gqa", "parallel"])
@pytest.mark.parametrize("granularity", ["heads", "layers"])
def test_acdc_and_edge_pruning_run_on_every_block_kind(kind: str, granularity: str) -> None:
    from mitk.analysis.discovery import acdc, edge_pruning

    model, prompts, metric = tiny(kind), random_pair(), LastLogit(3)
    graph = EdgeGraph.of(model, granularity)  # type: ignore[arg-type]
    found = acdc(model, prompts, metric, 1e-3, granularity=granularity)  # type: ignore[arg-type]
    learned = edge_pruning(model, prompts, metric, steps=3, granularity=granularity)  # type: ignore[arg-type]
    for result in (found, learned):
        assert result.scores.shape == graph.present.shape
        assert result.scores[~graph.present].isnan().all()
        assert result.circuit.graph.receivers == graph.receivers


@pytest.mark.parametrize("on", ["inputs", "activations"])
def test_positional_scores_add_up_over_positions_to_the_position_free_ones(on: str) -> None:
    model, prompts, metric = tiny("gqa"), random_pair(), LastLogit(3)
    free = eap_ig(model, prompts, metric, ig_steps=2, on=on)  # type: ignore[arg-type]
    per_pos = eap_ig(model, prompts, metric, ig_steps=2, on=on, positional=True, n_edges=7)  # type: ignore[arg-type]
    seq = prompts.clean.shape[1]
    assert per_pos.positional and per_pos.scores.shape == (seq, *free.scores.shape)
    torch.testing.assert_close(per_pos.scores.sum(0), free.scores, atol=1e-5, rtol=1e-4,
                               equal_nan=True)  # fmt: skip
    assert per_pos.circuit.positional and len(per_pos.circuit) == 7
    frame = per_pos.to_frame()
    assert len(frame) == seq * free.graph.n_edges and frame["in_circuit"].sum() == 7
    top = frame.iloc[0]
    assert (top["sender"], top["receiver"], top["pos"]) in per_pos.circuit


def test_a_positional_curve_counts_edges_at_every_position_and_ends_at_the_full_model() -> None:
    from mitk.analysis.discovery import faithfulness_curve

    model, prompts, metric = tiny("mha"), random_pair(), LastLogit(3)
    result = eap_ig(model, prompts, metric, ig_steps=1, positional=True)
    curve = faithfulness_curve(model, result, prompts, metric, fractions=(0.01, 0.1, 1.0))
    seq, total = prompts.clean.shape[1], result.graph.n_edges
    assert curve.n_edges[-1] == seq * total and curve.recovered[-1] == pytest.approx(1.0)
    assert curve.random[-1] == pytest.approx(1.0)  # every edge at every position: the model
    with pytest.raises(ValueError, match="sender, receiver"):
        Circuit.top(result.graph, result.scores[:, :2], 3)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.03), (torch.float64, 1e-5)])
@pytest.mark.parametrize("on", ["inputs", "activations"])
def test_eap_ig_runs_in_the_model_dtype(dtype: torch.dtype, tolerance: float, on: str) -> None:
    prompts, metric = random_pair(), LastLogit(3)
    reference = eap_ig(tiny("mha"), prompts, metric, ig_steps=2, on=on).scores  # type: ignore[arg-type]
    scores = eap_ig(tiny("mha").to(dtype), prompts, metric, ig_steps=2, on=on).scores  # type: ignore[arg-type]
    assert scores.dtype == torch.float32
    scale = float(reference.nan_to_num().abs().max())
    torch.testing.assert_close(scores, reference, atol=tolerance * scale, rtol=0, equal_nan=True)
