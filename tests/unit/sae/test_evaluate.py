"""SAE evaluation: FVU over the whole set, sparsity, and the loss cost of splicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mitk import HookedTransformer
from mitk.errors import ConfigError, ShapeMismatchError, UnknownHookError
from mitk.sae import ReconstructionStats, TensorActivations
from mitk.sae.collapse import CollapseWarning
from mitk.sae.evaluate import SAEEvaluation, evaluate
from mitk.sae.splice import spliced
from tests.unit.sae.test_splice import MLP_IN, MLP_OUT, RESID, perfect_sae, relu_sae, transcoder


def shifted_batches(seed: int = 0) -> torch.Tensor:
    """Two halves of 64 rows around very different means: per-batch FVUs mislead here."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(64, 8, generator=gen) + 4.0
    second = 0.2 * torch.randn(64, 8, generator=gen) - 4.0
    return torch.cat([first, second])


def numpy_fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_fvu_is_over_the_whole_set_not_a_mean_of_batches():
    x = shifted_batches()
    sae = relu_sae(8, 16, hook_name="")
    result = evaluate(sae, x, rows_per_batch=64)
    with torch.no_grad():
        x_hat = sae(x).reconstruction
    whole = numpy_fvu(x.double().numpy(), x_hat.double().numpy())
    halves = [numpy_fvu(x[s].double().numpy(), x_hat[s].double().numpy())
              for s in (slice(0, 64), slice(64, 128))]  # fmt: skip
    assert result.fvu == pytest.approx(whole, rel=1e-9)
    assert result.explained_variance == pytest.approx(1 - whole, rel=1e-9)
    assert abs(np.mean(halves) - whole) > 0.1 * whole  # the case really separates them
    mse = float(((x.double() - x_hat.double()) ** 2).sum(1).mean())
    assert result.mse == pytest.approx(mse, rel=1e-9)
    assert result.rows == 128


def test_l0_and_latent_frequencies_match_brute_force():
    x = shifted_batches(1)
    sae = relu_sae(8, 16, hook_name="", seed=3)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-3.0, 1.0, 16))  # some latents never fire, some always
    result = evaluate(sae, x, rows_per_batch=50)  # a ragged last batch
    with torch.no_grad():
        fired = sae.encode(x) != 0
    freq = fired.double().mean(0)
    torch.testing.assert_close(result.latent_frequencies, freq)
    assert result.l0 == pytest.approx(float(fired.sum(1).double().mean()))
    assert result.dead_fraction == pytest.approx(float((freq == 0).double().mean()))
    assert 0 < result.dead_fraction < 1
    assert result.dense_fraction == pytest.approx(float((freq > 0.1).double().mean()))


class OneHookSource:
    """A minimal activation source: scaled batches, like a normalising store serves."""

    def __init__(self, rows: torch.Tensor, batch_size: int, scale: float) -> None:
        self.rows, self.batch_size, self._scale = rows, batch_size, scale
        self.hook_names = ("acts",)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        part = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return {"acts": self.rows[part] * self._scale}

    def scale(self, hook_name: str) -> float:
        return self._scale


def test_a_source_is_read_in_raw_units_and_equals_the_tensor_path():
    x = shifted_batches(2)
    sae = relu_sae(8, 16, hook_name="")
    from_source = evaluate(sae, OneHookSource(x, 32, scale=3.0), n_batches=4)
    from_tensor = evaluate(sae, x)
    assert from_source.hook_name == "acts"
    assert from_source.rows == 128
    for key, value in from_tensor.to_dict().items():
        assert from_source.to_dict()[key] == pytest.approx(value, rel=1e-6), key
    with pytest.raises(UnknownHookError, match="'other'"):
        evaluate(sae, OneHookSource(x, 32, 1.0), hook_name="other")


def test_perfect_sae_recovers_all_the_loss(tiny: HookedTransformer, tokens: torch.Tensor):
    tokens = tokens % tiny.cfg.d_vocab
    result = evaluate(perfect_sae(32), model=tiny, tokens=tokens, sequences_per_batch=2)
    assert result.fvu == pytest.approx(0.0, abs=1e-12)
    assert result.rows == tokens.numel()
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_clean, abs=1e-6)
    assert result.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert result.ce_loss_increase == pytest.approx(0.0, abs=1e-6)
    assert not any("NaN" in note for note in result.notes)


def test_losses_match_the_three_forwards_on_the_same_tokens(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(5))
    sae = relu_sae(32, 48)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # make the SAE visibly lossy
    result = evaluate(sae, model=tiny, tokens=tokens, sequences_per_batch=2)
    with torch.no_grad():
        clean = float(tiny(tokens, return_type="loss"))
        with spliced(sae, tiny):
            spliced_loss = float(tiny(tokens, return_type="loss"))
        zeros = [(RESID, lambda x, hook: torch.zeros_like(x))]
        zero = float(tiny.run_with_hooks(tokens, return_type="loss", fwd_hooks=zeros))
    assert result.ce_loss_clean == pytest.approx(clean, rel=1e-5)
    assert result.ce_loss_spliced == pytest.approx(spliced_loss, rel=1e-5)
    assert result.ce_loss_zero_ablated == pytest.approx(zero, rel=1e-5)
    expected = (zero - spliced_loss) / (zero - clean)
    assert result.ce_loss_recovered == pytest.approx(expected, rel=1e-4)
    assert result.ce_loss_increase == pytest.approx(spliced_loss - clean, abs=1e-5)


def test_zero_sae_recovers_nothing(tiny: HookedTransformer, tokens: torch.Tensor):
    sae = relu_sae(32, 48)
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
    with pytest.warns(CollapseWarning, match="all 48 latents are dead"):
        result = evaluate(sae, model=tiny, tokens=tokens % tiny.cfg.d_vocab)
    assert any("all 48 latents are dead" in note for note in result.notes)
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_zero_ablated, abs=1e-6)
    assert result.ce_loss_recovered == pytest.approx(0.0, abs=1e-3)
    assert result.fvu >= 1.0  # x_hat = 0 leaves at least all the variance


def test_recovered_is_nan_when_zero_ablation_changes_nothing(tiny: HookedTransformer):
    """With the last MLP's output weights at 0, ablating its output is a no-op."""
    hook = "blocks.1.hook_mlp_out"
    tokens = torch.randint(0, 50, (2, 6))
    mlp = tiny.blocks[1].mlp
    with torch.no_grad():
        for param in mlp.parameters():
            param.zero_()
    with pytest.warns(CollapseWarning):  # a zero MLP output fires no latent either
        result = evaluate(relu_sae(32, 48, hook), model=tiny, tokens=tokens)
    assert result.ce_loss_zero_ablated == result.ce_loss_clean
    assert math.isnan(result.ce_loss_recovered or 0.0)
    assert any("ce_loss_recovered is NaN" in note for note in result.notes)


def test_padding_is_left_out_of_the_reconstruction_metrics(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(tokens)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    sae = relu_sae(32, 48)
    result = evaluate(sae, model=tiny, tokens=tokens, attention_mask=mask)
    _, cache = tiny.run_with_cache(tokens, mask, names_filter=RESID)
    real = cache[RESID][mask.bool()]
    direct = evaluate(sae, real)
    assert result.rows == int(mask.sum())
    assert result.fvu == pytest.approx(direct.fvu, rel=1e-5)
    assert result.l0 == pytest.approx(direct.l0)
    torch.testing.assert_close(result.latent_frequencies, direct.latent_frequencies)
    clean = float(tiny(tokens, mask, return_type="loss").detach())
    assert result.ce_loss_clean == pytest.approx(clean, rel=1e-5)


def test_frame_and_dict_hold_the_measured_metrics():
    result = evaluate(relu_sae(8, 16, hook_name="x"), shifted_batches())
    assert isinstance(result, SAEEvaluation)
    assert "ce_loss_clean" not in result.to_dict()  # no model: not measured, not NaN
    frame = result.to_frame()
    assert list(frame.columns) == ["hook_name", "metric", "value"]
    assert set(frame["metric"]) == set(result.to_dict())
    assert frame.set_index("metric").loc["fvu", "value"] == result.fvu


def test_bad_requests_are_refused(tiny: HookedTransformer):
    sae = relu_sae(32, 48)
    with pytest.raises(ConfigError, match="both model= and tokens="):
        evaluate(sae, model=tiny)
    with pytest.raises(ConfigError, match="needs activations"):
        evaluate(sae)
    with pytest.raises(ShapeMismatchError, match="d_in=32"):
        evaluate(sae, torch.randn(10, 16))


# --- transcoders are measured against their target ---------------------------------------------
def test_transcoder_metrics_compare_with_the_target_in_every_path(tiny: HookedTransformer):
    tokens = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(3))
    sae = transcoder(skip=True)
    _, cache = tiny.run_with_cache(tokens, names_filter=[MLP_IN, MLP_OUT])
    x, y = cache[MLP_IN].reshape(-1, 32), cache[MLP_OUT].reshape(-1, 32)
    expected = numpy_fvu(y.double().numpy(), sae(x).reconstruction.detach().double().numpy())
    from_tensors = evaluate(sae, x, targets=y)
    assert from_tensors.fvu == pytest.approx(expected, rel=1e-5)
    source = TensorActivations({MLP_IN: x, MLP_OUT: y}, batch_size=6, normalize=True)
    from_source = evaluate(sae, source, n_batches=3)
    assert from_source.rows == 18
    reference = ReconstructionStats(32, 48)
    with torch.no_grad():
        for step in range(3):
            batch = source.batch(step)
            bx, by = (batch[n] / source.scale(n) for n in (MLP_IN, MLP_OUT))
            out = sae(bx)
            reference.update(by, out.reconstruction, out.latents)
    assert from_source.fvu == pytest.approx(reference.fvu, rel=1e-5)
    with_model = evaluate(sae, model=tiny, tokens=tokens)
    assert with_model.fvu == pytest.approx(expected, rel=1e-4)
    with torch.no_grad(), tiny.hooks(fwd_hooks=[(MLP_OUT, lambda a, p: torch.zeros_like(a))]):
        zeroed = tiny(tokens, return_type="loss")
    assert with_model.ce_loss_zero_ablated == pytest.approx(float(zeroed), rel=1e-6)


def test_transcoder_evaluation_needs_its_targets():
    sae = transcoder()
    with pytest.raises(ConfigError, match="pass its activations as targets="):
        evaluate(sae, torch.randn(4, 32))
    with pytest.raises(ShapeMismatchError, match="d_out=32"):
        evaluate(sae, torch.randn(4, 32), targets=torch.randn(4, 16))
    with pytest.raises(ConfigError, match="targets= is for transcoders"):
        evaluate(relu_sae(32, 48), torch.randn(4, 32), targets=torch.randn(4, 32))
