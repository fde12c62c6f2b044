"""Probes: batched fits equal per-layer references, planted directions found, controls at chance."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.probe_fit import fit_logistic, roc_auc
from mitk.analysis.probes import ProbeResult, probe_activations, train_probes
from mitk.errors import ShapeMismatchError


def planted(
    n: int = 400, d: int = 16, layers: int = 4, strength: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian activations; layers 2 and 3 carry ``label * direction * strength``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, n, d, generator=gen)
    labels = torch.rand(n, generator=gen) < 0.5
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    x[2:] += strength * (labels.float() * 2 - 1)[:, None] * direction
    return x, labels, direction


def train_split(result: ProbeResult, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[result.test_rows] = False
    return keep.nonzero()[:, 0]


def test_roc_auc_counts_pairs_with_ties_as_half():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 40), generator=gen).double()  # many ties
    labels = torch.rand(6, 40, generator=gen) < 0.4
    pos = scores[:, :, None]
    neg = scores[:, None, :]
    pair = labels[:, :, None] & ~labels[:, None, :]
    wins = ((pos > neg).double() + 0.5 * (pos == neg).double()) * pair
    expected = wins.sum((1, 2)) / pair.sum((1, 2))
    torch.testing.assert_close(roc_auc(scores, labels), expected)
    assert torch.isnan(roc_auc(torch.randn(5), torch.ones(5, dtype=torch.bool)))
    sklearn = pytest.importorskip("sklearn.metrics")
    for row in range(6):
        assert roc_auc(scores[row], labels[row]).item() == pytest.approx(
            sklearn.roc_auc_score(labels[row].numpy(), scores[row].numpy())
        )


def test_a_planted_direction_is_found_and_the_controls_stay_at_chance():
    x, labels, direction = planted()
    result = train_probes(x, labels)
    assert result.accuracy[2:].min() > 0.95 and result.roc_auc[2:].min() > 0.98
    assert result.accuracy[:2].max() < 0.7  # noise layers: chance
    for control in (result.control_accuracy, result.shuffled_accuracy):
        assert control.max() < 0.7
    assert result.control_roc_auc.sub(0.5).abs().max() < 0.2
    assert result.selectivity[2:].min() > 0.25
    cosine = torch.nn.functional.cosine_similarity(result.weights[2:], direction[None], dim=-1)
    assert cosine.min() > 0.9
    # the stored weights reproduce the probe's held-out predictions in raw units
    held = x[:, result.test_rows]
    predicted = (result.scores(held) > 0) == labels[result.test_rows]
    torch.testing.assert_close(predicted.float().mean(-1), result.accuracy)
    frame = result.to_frame()
    assert list(frame["layer"]) == ["0", "1", "2", "3"]
    assert {"accuracy", "roc_auc", "control_accuracy", "selectivity", "shuffled_roc_auc"} <= set(
        frame.columns
    )


def test_ridge_equals_a_per_layer_closed_form():
    x, labels, _ = planted(n=120, d=8, seed=1)
    l2 = 0.05
    result = train_probes(x.double(), labels, "ridge", l2=l2)  # float64 in, float64 solve
    train = train_split(result, len(labels))
    for layer in range(x.shape[0]):
        xs = x[layer, train].double()
        t = labels[train].double() * 2 - 1
        mean = xs.mean(0)
        centred = xs - mean
        scale2 = centred.square().mean()
        # mean((t - x·w - b)²) + l2·scale²·|w|² in raw units
        a = centred.T @ centred + len(train) * l2 * scale2 * torch.eye(8, dtype=torch.float64)
        w = torch.linalg.solve(a, centred.T @ (t - t.mean()))
        b = t.mean() - mean @ w
        torch.testing.assert_close(result.weights[layer].double(), w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.bias[layer].double(), b, atol=1e-6, rtol=1e-5)


def test_ridge_primal_and_dual_agree():
    """More features than rows switches to the dual system; the weights do not change."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, 50, generator=gen)
    labels = torch.arange(30) % 2 == 0
    wide = train_probes(x.double(), labels, "ridge", l2=0.1)
    train = train_split(wide, 30)
    xs = x[:, train].double()
    centred = xs - xs.mean(1, keepdim=True)
    scale2 = centred.square().mean((1, 2))
    t = labels[train].double() * 2 - 1
    for layer in range(2):
        c = centred[layer]
        a = c.T @ c + len(train) * 0.1 * scale2[layer] * torch.eye(50, dtype=torch.float64)
        w = torch.linalg.solve(a, c.T @ (t - t.mean()))
        torch.testing.assert_close(wide.weights[layer].double(), w, atol=1e-6, rtol=1e-5)


def reference_logistic(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """One layer at a time, float64 L-BFGS: mean log-loss + penalty/2·|w|² on raw features."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
        loss = loss + 0.5 * penalty * w[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_logistic_equals_a_per_layer_reference(solver: str):
    x, labels, _ = planted(n=200, d=6, strength=1.0, seed=3)
    l2 = 0.02
    result = train_probes(x.double(), labels, l2=l2, solver=solver)
    train = train_split(result, len(labels))
    sklearn = None
    try:
        from sklearn.linear_model import LogisticRegression

        sklearn = LogisticRegression
    except ImportError:  # not a dependency: the torch reference still runs
        pass
    for layer in range(x.shape[0]):
        xs = x[layer, train].double()
        scale2 = (xs - xs.mean(0)).square().mean()
        ref = reference_logistic(xs, labels[train].double(), l2 * float(scale2))
        torch.testing.assert_close(result.weights[layer].double(), ref[:-1], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(result.bias[layer].double(), ref[-1], atol=2e-4, rtol=1e-3)
        if sklearn is not None:
            model = sklearn(C=1 / (len(train) * l2 * float(scale2)), tol=1e-10, max_iter=10_000)
            model.fit(xs.numpy(), labels[train].numpy())
            torch.testing.assert_close(
                result.weights[layer].double(),
                torch.from_numpy(model.coef_[0]),
                atol=1e-3,
                rtol=1e-3,
            )


def test_float32_fits_agree_with_float64_ones():
    x, labels, _ = planted(n=200, d=6, strength=1.0, seed=3)
    for kind in ("logistic", "ridge"):
        single, double = train_probes(x, labels, kind), train_probes(x.double(), labels, kind)
        torch.testing.assert_close(single.weights, double.weights.float(), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(single.accuracy, double.accuracy)


def test_newton_accumulates_its_hessians_over_blocks_of_rows(monkeypatch: pytest.MonkeyPatch):
    import mitk.analysis.probe_fit as probe_fit

    x, labels, _ = planted(n=90, d=5, strength=1.0, seed=7)
    whole = train_probes(x.double(), labels, solver="newton")
    monkeypatch.setattr(probe_fit, "CHUNK_ELEMENTS", 200)  # a few rows per block
    blocks = train_probes(x.double(), labels, solver="newton")
    torch.testing.assert_close(blocks.weights, whole.weights)
    torch.testing.assert_close(blocks.bias, whole.bias)


def test_logistic_refuses_no_penalty_and_unknown_solver():
    z, y = torch.randn(1, 10, 3), torch.ones(1, 1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="l2 > 0"):
        fit_logistic(z, y, 0.0)
    with pytest.raises(ValueError, match="solver"):
        fit_logistic(z, y, 0.1, "sgd")  # type: ignore[arg-type]


def test_the_control_task_catches_a_probe_that_memorises_token_identity():
    """Each of 40 token types has its own embedding and a label by type: the probe can only
    memorise types, and the control task (random labels per type) is memorised just as well."""
    gen = torch.Generator().manual_seed(4)
    types = torch.randint(0, 40, (800,), generator=gen)
    embeddings = torch.randn(40, 48, generator=gen)
    x = (embeddings[types] + 0.05 * torch.randn(800, 48, generator=gen))[None]
    label_of_type = torch.rand(40, generator=gen) < 0.5
    labels = label_of_type[types]
    result = train_probes(x, labels, control_groups=types, l2=1e-4)
    assert result.accuracy[0] > 0.95
    assert result.control_accuracy[0] > 0.9  # memorised too
    assert result.selectivity[0] < 0.1
    assert result.shuffled_accuracy[0] < 0.7  # rows shuffled against labels: chance


def test_top_k_reads_the_latent_that_carries_the_label():
    """SAE-like latents: sparse, non-negative; latent 5 fires only on positives in layer 1."""
    gen = torch.Generator().manual_seed(5)
    n = 300
    latents = torch.relu(torch.randn(2, n, 64, generator=gen) - 1.5)
    labels = torch.rand(n, generator=gen) < 0.5
    latents[1, :, 5] = labels.float() * (1 + torch.rand(n, generator=gen))
    result = train_probes(latents, labels, top_k=1)
    assert result.features[1].tolist() == [5]
    assert result.accuracy[1] > 0.97 and result.accuracy[0] < 0.7
    assert result.weights.shape == (2, 1)
    sparse = train_probes(latents, labels, "ridge", top_k=4)
    assert 5 in sparse.features[1].tolist() and sparse.accuracy[1] > 0.95
    held = latents[:, sparse.test_rows]
    correct = (sparse.scores(held) > 0) == labels[sparse.test_rows]
    torch.testing.assert_close(correct.float().mean(-1), sparse.accuracy)


def test_probes_from_a_model_read_token_identity_at_the_embedding(tiny: HookedTransformer):
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 50, (160, 5), generator=gen)
    labels = tokens[:, -1] < 25
    hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    acts = probe_activations(tiny, tokens, hooks)
    assert {k: tuple(v.shape) for k, v in acts.items()} == dict.fromkeys(hooks, (160, 32))
    result = train_probes(acts, labels, l2=1e-4)
    assert result.layers == hooks
    direct = train_probes((tiny, tokens, hooks), labels, l2=1e-4)
    torch.testing.assert_close(direct.weights, result.weights)
    assert result.accuracy[0] > 0.8  # 50 embeddings in 32 dimensions: nearly separable


def test_bad_inputs_are_refused():
    x, labels, _ = planted(n=40)
    with pytest.raises(ValueError, match="binary"):
        train_probes(x, labels.long() * 2)
    with pytest.raises(ValueError, match="both classes"):
        train_probes(x, torch.zeros(40, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError, match="labels"):
        train_probes(x, labels[:10])
    with pytest.raises(ShapeMismatchError, match="same"):
        train_probes({"a": torch.randn(40, 3), "b": torch.randn(40, 4)}, labels)
    with pytest.raises(ValueError, match="kind"):
        train_probes(x, labels, "svm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        train_probes(x, labels, top_k=99)
