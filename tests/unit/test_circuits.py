"""QK/OV circuits, full token-space circuits, copying and composition scores.

The circuits are checked against what a forward actually computes (scores from
the cache, head outputs), and the composition scores against a brute-force
loop over materialised matrices.
"""

from __future__ import annotations

import pytest
import torch

from mitk import ActivationCache, HookedTransformer, TransformerConfig
from mitk.analysis.circuits import full_ov_circuit, full_qk_circuit, ov_copying_scores
from mitk.analysis.composition import composition_baseline, composition_scores
from mitk.analysis.detectors import head_detector_scores
from mitk.errors import ConfigError, MitkError
from mitk.model.factored_matrix import FactoredMatrix

TOL = {"atol": 1e-9, "rtol": 1e-7}


def build(**overrides: object) -> HookedTransformer:
    """A float64 3-layer model (attention-only unless told) with non-trivial biases and norms."""
    fields = {"d_model": 24, "n_layers": 3, "n_heads": 4, "d_vocab": 30, "n_ctx": 16, "d_mlp": 0,
              "dtype": "float64", **overrides}  # fmt: skip
    model = HookedTransformer(TransformerConfig(**fields), seed=3)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(scope="module")
def gqa() -> HookedTransformer:
    """Grouped-query attention (2 query heads per kv head), no qkv biases."""
    return build(n_key_value_heads=2, attn_qkv_bias=False)


@pytest.fixture(scope="module")
def mha() -> HookedTransformer:
    return build(d_mlp=48)


# --- QK and OV ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_qk_and_ov_shapes_and_values(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    cfg = model.cfg
    qk, ov = model.QK, model.OV
    shape = (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    assert isinstance(qk, FactoredMatrix) and qk.shape == shape and qk.mdim == cfg.d_head
    assert isinstance(ov, FactoredMatrix) and ov.shape == shape and ov.mdim == cfg.d_head
    group = cfg.n_heads // cfg.n_key_value_heads
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        for head in range(cfg.n_heads):
            kv = head // group
            W_QK = attn.W_Q[head] @ attn.W_K[kv].T
            W_OV = attn.W_V[kv] @ attn.W_O[head]
            torch.testing.assert_close(qk[layer, head].AB, W_QK, **TOL)
            torch.testing.assert_close(ov[layer, head].AB, W_OV, **TOL)


def _attn_input(model: HookedTransformer, cache: ActivationCache, layer: int) -> torch.Tensor:
    ln = model.blocks[layer].ln1
    return cache[f"blocks.{layer}.ln1.hook_normalized"] * ln.w + ln.b


def test_qk_reproduces_the_attention_scores_of_a_forward(gqa: HookedTransformer) -> None:
    """Without qkv biases, ``x_q @ QK @ x_kᵀ · scale`` is exactly the cached score, GQA included."""
    tokens = torch.randint(0, gqa.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    _, cache = gqa.run_with_cache(tokens)
    group = gqa.cfg.kv_group_size
    for layer in range(gqa.cfg.n_layers):
        x = _attn_input(gqa, cache, layer)  # [batch, pos, d_model]
        predicted = x[:, None] @ gqa.QK[layer].AB @ x[:, None].mT  # [batch, head, pos, pos]
        q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
        k = k.repeat_interleave(group, dim=2)
        q_dot_k = torch.einsum("bqhd,bkhd->bhqk", q, k)
        torch.testing.assert_close(predicted, q_dot_k, atol=1e-10, rtol=1e-8)
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        causal = torch.isfinite(scores)
        scaled = predicted * gqa.cfg.attn_scale
        torch.testing.assert_close(scaled[causal], scores[causal], atol=1e-10, rtol=1e-8)


def test_ov_reproduces_what_each_head_writes(gqa: HookedTransformer) -> None:
    """Each head adds ``pattern @ x @ OV`` (no value bias); their sum plus b_O is attn_out."""
    tokens = torch.randint(0, gqa.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    _, cache = gqa.run_with_cache(tokens)
    for layer in range(gqa.cfg.n_layers):
        x = _attn_input(gqa, cache, layer)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
        per_head = pattern @ (x[:, None] @ gqa.OV[layer].AB)  # [batch, head, pos, d_model]
        expected = cache[f"blocks.{layer}.hook_attn_out"] - gqa.blocks[layer].attn.b_O
        torch.testing.assert_close(per_head.sum(1), expected, atol=1e-10, rtol=1e-8)


# --- full circuits and copying -----------------------------------------------------------
def test_full_circuits_equal_the_materialised_products(mha: HookedTransformer) -> None:
    cfg = mha.cfg
    shape = (cfg.n_layers, cfg.n_heads, cfg.d_vocab, cfg.d_vocab)
    qk, ov = full_qk_circuit(mha), full_ov_circuit(mha)
    assert qk.shape == shape and ov.shape == shape
    assert qk.mdim == ov.mdim == cfg.d_head
    torch.testing.assert_close(qk.AB, mha.W_E @ mha.QK.AB @ mha.W_E.T, **TOL)
    torch.testing.assert_close(ov.AB, mha.W_E @ mha.OV.AB @ mha.W_U, **TOL)


def test_copying_scores_match_eigenvalues_of_the_full_circuit(mha: HookedTransformer) -> None:
    scores = ov_copying_scores(mha)
    assert scores.shape == (mha.cfg.n_layers, mha.cfg.n_heads)
    assert not scores.requires_grad
    eig = torch.linalg.eigvals(full_ov_circuit(mha).AB)  # d_vocab eigenvalues, mostly ~0
    brute = eig.sum(-1).real / eig.abs().sum(-1)
    torch.testing.assert_close(scores, brute, atol=1e-6, rtol=0)
    assert ((scores >= -1) & (scores <= 1)).all()


def test_flipping_a_head_output_flips_its_copying_score() -> None:
    model = build()
    before = ov_copying_scores(model)
    with torch.no_grad():
        model.blocks[1].attn.W_O[2].neg_()
    after = ov_copying_scores(model)
    torch.testing.assert_close(after[1, 2], -before[1, 2])
    mask = torch.ones_like(before, dtype=torch.bool)
    mask[1, 2] = False
    torch.testing.assert_close(after[mask], before[mask])


# --- composition -------------------------------------------------------------------------
def _brute_composition(model: HookedTransformer, kind: str) -> torch.Tensor:
    ov, qk = model.OV.AB, model.QK.AB
    reader = {"Q": qk, "K": qk.mT, "V": ov}[kind]
    n_layers, n_heads = ov.shape[:2]
    out = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=ov.dtype)
    for lw in range(n_layers):
        for hw in range(n_heads):
            for lr in range(lw + 1, n_layers):
                for hr in range(n_heads):
                    left, right = ov[lw, hw], reader[lr, hr]
                    out[lw, hw, lr, hr] = torch.linalg.matrix_norm(left @ right) / (
                        torch.linalg.matrix_norm(left) * torch.linalg.matrix_norm(right)
                    )
    return out


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_composition_scores_match_brute_force(
    kind: str, name: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(name)
    scores = composition_scores(model, kind)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert scores.shape == (n_layers, n_heads, n_layers, n_heads)
    assert not scores.requires_grad
    torch.testing.assert_close(scores, _brute_composition(model, kind), atol=1e-10, rtol=1e-8)
    writer_layer = torch.arange(n_layers)[:, None, None, None]
    reader_layer = torch.arange(n_layers)[None, None, :, None]
    not_later = (reader_layer <= writer_layer).expand_as(scores)
    assert (scores[not_later] == 0).all()
    assert ((scores[~not_later] > 0) & (scores[~not_later] <= 1)).all()


def test_unknown_composition_kind_is_a_clear_error(mha: HookedTransformer) -> None:
    for bad in ("q", "QK", ""):
        with pytest.raises(ConfigError, match="'Q', 'K', 'V'") as info:
            composition_scores(mha, bad)
        assert isinstance(info.value, MitkError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        composition_baseline(mha, "O")


def test_baseline_is_seeded_shape_only_and_sane(mha: HookedTransformer) -> None:
    base = composition_baseline(mha, "K", samples=200)
    assert 0 < base.mean < 1 and 0 < base.std < base.mean
    assert composition_baseline(mha, "K", samples=200) == base  # seeded: reproducible
    assert composition_baseline(mha, "Q", samples=200) == base  # same shapes, same null
    assert composition_baseline(mha, "K", samples=200, seed=1) != base
    with pytest.raises(ConfigError, match="samples"):
        composition_baseline(mha, "K", samples=1)


def test_random_init_model_scores_like_the_baseline() -> None:
    """A Gaussian-initialised model is a draw from the null: its scores sit at the baseline."""
    model = build(d_model=32, n_layers=4, n_heads=4, attn_qkv_bias=False)
    n_layers = model.cfg.n_layers
    later = torch.arange(n_layers)[:, None] < torch.arange(n_layers)[None, :]
    for kind in ("Q", "K", "V"):
        scores = composition_scores(model, kind).permute(0, 2, 1, 3)[later]  # valid pairs
        base = composition_baseline(model, kind, samples=400)
        assert abs(float(scores.mean()) - base.mean) < 3 * base.std / scores.numel() ** 0.5 + 0.01
        assert float(scores.max()) < base.mean + 5 * base.std


# --- behaviour on the trained induction model ------------------------------------------
@pytest.fixture(scope="module")
def toy() -> HookedTransformer:
    return HookedTransformer.from_pretrained("toy-induction")


def test_previous_token_head_k_composes_into_an_induction_head(toy: HookedTransformer) -> None:
    """The strongest layer-0 → layer-1 K-composition stands far above chance, and links the
    detector's previous-token head to an induction head (no head index is assumed)."""
    k_comp = composition_scores(toy, "K")[0, :, 1, :]  # [writer head in L0, reader head in L1]
    base = composition_baseline(toy, "K")
    assert float(k_comp.max()) > base.mean + 3 * base.std
    writer, reader = divmod(int(k_comp.argmax()), toy.cfg.n_heads)
    detected = head_detector_scores(toy).set_index(["layer", "head"])
    assert writer == int(detected.loc[0, "previous_token"].idxmax())
    assert detected.loc[(1, reader), "induction"] > 0.5
