"""mitk's ActivationCache against transformer-lens 3.9's, on the same GPT-2 weights.

Both caches come from one forward of the same unprocessed random 3-layer GPT-2
(``_tl_hooked_transformer`` builds transformer-lens's without folding or
centring, as mitk loads it). Hypothesis draws argument combinations for each
method; wherever transformer-lens answers, mitk gives the same values (1e-5)
and the same labels. Where transformer-lens raises, mitk raises a
``MitkError`` or, for a selection with no components, returns an empty stack.

Documented differences, each asserted on its own below instead:
- ``layer`` counts from the end for every negative value (``-2`` is
  ``n_layers - 1``); transformer-lens reads only ``-1`` that way.
- ``incl_remainder`` at ``layer=0`` is the stream entering layer 0 (the
  embeddings); transformer-lens's index wraps to the final stream.
- ``mlp_input=True`` at the unembed (``layer=n_layers``) is refused.
- an int ``neuron_slice`` keeps the neuron dim in ``stack_neuron_results``
  (transformer-lens 3.9 crashes; later versions keep it too).
- an int ``neuron_slice`` with ``project_output_onto`` gives the unprojected
  result times the projection (transformer-lens 3.9 keeps a dim of 1 for a
  vector and raises for a matrix; later versions agree with mitk).
- ``get_full_resid_decomposition(mlp_input=True, apply_ln=True,
  project_output_onto=...)`` scales the neurons by ``ln2`` like every other
  component; transformer-lens 3.9 uses ``ln1`` for the neurons only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import torch
from transformer_lens.utilities import Slice as TLSlice

from mitk import HookedTransformer
from mitk.cache import ActivationCache
from mitk.cache.errors import CacheArgumentError
from mitk.errors import MitkError
from mitk.hooks import HookKind
from mitk.utils import Slice
from tests.parity.test_transformer_lens import _tl_hooked_transformer, tl_deprecation

pytestmark = tl_deprecation
ATOL = 1e-5
N_LAYERS = 3  # the conftest GPT-2
LAYERS = [None, -1, 0, 1, 2, 3]
POS_SLICES: list[Any] = [None, -1, 0, 3, (1, 4), (0, 6, 2), slice(2, None), [0, 3, 5],
                         torch.tensor([1, 2]), np.array([4, 0]), ("Slice", -1),
                         ("Slice", (1, 3))]  # fmt: skip
BATCH_SLICES: list[Any] = [None, -1, 0, [1, 0], (0, 1)]
settings.register_profile("cache-parity", max_examples=40, deadline=None)


def _slice_pair(value: Any) -> tuple[Any, Any]:
    """The same selection for both libraries (each wants its own ``Slice`` class)."""
    if isinstance(value, tuple) and value[0] == "Slice":  # one Slice of each kind
        return Slice(value[1]), TLSlice(value[1])
    return value, value


@pytest.fixture(scope="module")
def models(gpt2_dir: Path, gpt2: HookedTransformer) -> tuple[HookedTransformer, Any]:
    return gpt2, _tl_hooked_transformer(gpt2_dir)


@pytest.fixture(scope="module")
def caches(models: tuple[HookedTransformer, Any]) -> tuple[ActivationCache, Any]:
    ours_model, tl = models
    tokens = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, theirs = tl.run_with_cache(tokens)
        _, ours = ours_model.run_with_cache(tokens)
    return ours, theirs


def _tensor_of(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def agree(ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
    """mitk's answer equals transformer-lens's, or both refuse (an empty stack may stand in)."""
    try:
        expected = theirs()
    except Exception:  # transformer-lens refuses: mitk must refuse clearly or select nothing
        try:
            got = ours()
        except MitkError:
            return
        assert _tensor_of(got).shape[0] == 0, "transformer-lens raises here; mitk answered"
        return
    with torch.no_grad():
        got = ours()
    torch.testing.assert_close(_tensor_of(got), _tensor_of(expected), atol=ATOL, rtol=0)
    if isinstance(expected, tuple):
        assert got[1] == expected[1]


def _resolved(layer: int | None) -> int:
    return N_LAYERS if layer is None or layer == -1 else layer


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from(LAYERS), incl_mid=st.booleans(), apply_ln=st.booleans(),
    pos=st.sampled_from(POS_SLICES), mlp_input=st.booleans(),
)  # fmt: skip
def test_accumulated_resid(caches, layer, incl_mid, apply_ln, pos, mlp_input) -> None:
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    kwargs = dict(layer=layer, incl_mid=incl_mid, apply_ln=apply_ln, mlp_input=mlp_input,
                  return_labels=True)  # fmt: skip
    if mlp_input and _resolved(layer) == N_LAYERS:
        with pytest.raises(CacheArgumentError, match="mlp_input"):
            ours.accumulated_resid(pos_slice=mine, **kwargs)
        return
    agree(lambda: ours.accumulated_resid(pos_slice=mine, **kwargs),
          lambda: theirs.accumulated_resid(pos_slice=tl, **kwargs))  # fmt: skip


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from(LAYERS), mlp_input=st.booleans(),
    mode=st.sampled_from(["all", "attn", "mlp"]), apply_ln=st.booleans(),
    pos=st.sampled_from(POS_SLICES), incl_embeds=st.booleans(),
)  # fmt: skip
def test_decompose_resid(caches, layer, mlp_input, mode, apply_ln, pos, incl_embeds) -> None:
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    kwargs = dict(layer=layer, mlp_input=mlp_input, mode=mode, apply_ln=apply_ln,
                  incl_embeds=incl_embeds, return_labels=True)  # fmt: skip
    if mlp_input and _resolved(layer) == N_LAYERS:
        with pytest.raises(CacheArgumentError, match="mlp_input"):
            ours.decompose_resid(pos_slice=mine, **kwargs)
        return
    agree(lambda: ours.decompose_resid(pos_slice=mine, **kwargs),
          lambda: theirs.decompose_resid(pos_slice=tl, **kwargs))  # fmt: skip


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from(LAYERS), incl_remainder=st.booleans(),
    pos=st.sampled_from(POS_SLICES), apply_ln=st.booleans(),
)  # fmt: skip
def test_stack_head_results(caches, layer, incl_remainder, pos, apply_ln) -> None:
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    kwargs = dict(layer=layer, incl_remainder=incl_remainder, apply_ln=apply_ln,
                  return_labels=True)  # fmt: skip
    if layer == 0 and incl_remainder:  # documented difference: tested below
        return
    agree(lambda: ours.stack_head_results(pos_slice=mine, **kwargs),
          lambda: theirs.stack_head_results(pos_slice=tl, **kwargs))  # fmt: skip


NEURON_SLICES: list[Any] = [None, [0, 5, 7], (3, 9), slice(None, None, 50), torch.tensor([2, 1])]
PROJECTIONS = [None, "vector", "matrix"]


def _projection(kind: str | None) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(11)
    if kind is None:
        return None
    return torch.randn(64, generator=gen) if kind == "vector" else torch.randn(64, 3, generator=gen)


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from(LAYERS), pos=st.sampled_from(POS_SLICES),
    neurons=st.sampled_from(NEURON_SLICES), incl_remainder=st.booleans(),
    apply_ln=st.booleans(), project=st.sampled_from(PROJECTIONS),
)  # fmt: skip
def test_stack_neuron_results(caches, layer, pos, neurons, incl_remainder, apply_ln,
                              project) -> None:  # fmt: skip
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    kwargs = dict(layer=layer, neuron_slice=neurons, incl_remainder=incl_remainder,
                  apply_ln=apply_ln, project_output_onto=_projection(project),
                  return_labels=True)  # fmt: skip
    if layer == 0 and incl_remainder:
        return
    agree(lambda: ours.stack_neuron_results(pos_slice=mine, **kwargs),
          lambda: theirs.stack_neuron_results(pos_slice=tl, **kwargs))  # fmt: skip


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from(LAYERS), mlp_input=st.booleans(), expand=st.booleans(),
    apply_ln=st.booleans(), pos=st.sampled_from(POS_SLICES),
    project=st.sampled_from(PROJECTIONS),
)  # fmt: skip
def test_full_resid_decomposition(caches, layer, mlp_input, expand, apply_ln, pos,
                                  project) -> None:  # fmt: skip
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    kwargs = dict(layer=layer, mlp_input=mlp_input, expand_neurons=expand, apply_ln=apply_ln,
                  project_output_onto=_projection(project), return_labels=True)  # fmt: skip
    if mlp_input and _resolved(layer) == N_LAYERS:
        with pytest.raises(CacheArgumentError, match="mlp_input"):
            ours.get_full_resid_decomposition(pos_slice=mine, **kwargs)
        return
    if mlp_input and apply_ln and expand and project is not None and _resolved(layer) > 0:
        return  # documented difference (transformer-lens scales the neurons by ln1 here)
    agree(lambda: ours.get_full_resid_decomposition(pos_slice=mine, **kwargs),
          lambda: theirs.get_full_resid_decomposition(pos_slice=tl, **kwargs))  # fmt: skip


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from([-3, -1, 0, 1, 2]), neurons=st.sampled_from([*NEURON_SLICES, 4, -1]),
    pos=st.sampled_from(POS_SLICES), project=st.sampled_from(PROJECTIONS),
)  # fmt: skip
def test_get_neuron_results(caches, layer, neurons, pos, project) -> None:
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    direction = _projection(project)
    if isinstance(neurons, int) and direction is not None:
        return  # documented difference: tested below
    agree(lambda: ours.get_neuron_results(layer, neurons, mine, direction),
          lambda: theirs.get_neuron_results(layer, neurons, tl, direction))  # fmt: skip


@settings(settings.get_profile("cache-parity"))
@given(
    layer=st.sampled_from(LAYERS), mlp_input=st.booleans(), pos=st.sampled_from(POS_SLICES),
    batch=st.sampled_from(BATCH_SLICES), recompute=st.booleans(),
)  # fmt: skip
def test_apply_ln_to_stack(caches, layer, mlp_input, pos, batch, recompute) -> None:
    ours, theirs = caches
    mine, tl = _slice_pair(pos)
    stack = theirs.decompose_resid(pos_slice=tl)
    kwargs = dict(layer=layer, mlp_input=mlp_input, batch_slice=batch, recompute_ln=recompute)
    if mlp_input and _resolved(layer) == N_LAYERS:
        with pytest.raises(CacheArgumentError, match="mlp_input"):
            ours.apply_ln_to_stack(stack, pos_slice=mine, **kwargs)
        return
    agree(lambda: ours.apply_ln_to_stack(stack, pos_slice=mine, **kwargs),
          lambda: theirs.apply_ln_to_stack(stack, pos_slice=tl, **kwargs))  # fmt: skip


TOKENS: list[Any] = [
    5,
    torch.tensor(7),
    torch.tensor([3, 9]),
    torch.tensor([[1, 2, 3, 4, 5, 6]] * 2),
]


@settings(settings.get_profile("cache-parity"))
@given(
    tokens=st.sampled_from(range(len(TOKENS))), wrong=st.sampled_from([None, *range(len(TOKENS))]),
    pos=st.sampled_from([None, -1, (1, 3)]), batch=st.sampled_from(BATCH_SLICES),
    has_batch_dim=st.booleans(),
)  # fmt: skip
def test_logit_attrs(models, caches, tokens, wrong, pos, batch, has_batch_dim) -> None:
    ours, theirs = caches
    if not hasattr(models[0], "tokens_to_residual_directions"):
        pytest.skip("waiting for HookedTransformer.tokens_to_residual_directions (model API)")
    stack = theirs.accumulated_resid(pos_slice=pos)
    if not has_batch_dim:
        stack = stack[:, 0]
    answer = TOKENS[tokens]
    incorrect = None if wrong is None else TOKENS[wrong]
    kwargs = dict(pos_slice=pos, batch_slice=batch, has_batch_dim=has_batch_dim)
    agree(lambda: ours.logit_attrs(stack, answer, incorrect, **kwargs),
          lambda: theirs.logit_attrs(stack, answer, incorrect, **kwargs))  # fmt: skip


def test_stack_activation_and_keys(caches) -> None:
    ours, theirs = caches
    for args in [("scale", -1, "ln1"), ("scale", 1, "ln2"), ("pattern",), ("resid_pre", 2),
                 ("z", 0), ("post", None, "mlp"), ("attn_out", 3)]:  # fmt: skip
        agree(lambda a=args: ours.stack_activation(*a), lambda a=args: theirs.stack_activation(*a))
    for key in [("scale", 1, "ln1"), ("scale", -1, "ln1"), ("k", -1, None), "embed",
                ("embed", None), "scale2ln1", ("resid_post", -1), ("resid_pre", -3), "k1a",
                "blocks.2.hook_mlp_out", ("pattern", 1, "a"), "normalized"]:  # fmt: skip
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=str(key))


def test_head_results_match_compute_head_results(caches) -> None:
    ours, theirs = caches
    theirs.compute_head_results()
    for layer in range(N_LAYERS):
        name = f"blocks.{layer}.attn.hook_result"
        assert name not in ours  # derived on demand, not stored
        torch.testing.assert_close(ours[name], theirs[name], atol=ATOL, rtol=0)
    if "result" in get_args(HookKind):  # the short name, once mitk.hooks spells it
        for key in [("result", 1), ("result", -1, "attn"), "result0", "result2a"]:
            torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=str(key))


def same_method_calls(mine: Any, tl: Any, calls: list[tuple[str, tuple, dict]]) -> None:
    """Each ``(method, args, kwargs)`` gives the same answer on both caches."""
    for method, args, kwargs in calls:
        agree(lambda: getattr(mine, method)(*args, **kwargs),  # noqa: B023  (called at once)
              lambda: getattr(tl, method)(*args, **kwargs))  # noqa: B023  # fmt: skip


def test_batch_slices_and_a_batchless_cache(models, caches) -> None:
    ours, theirs = caches
    variants = [dict(pos_slice=p, apply_ln=ln) for p in (None, -1, (1, 3)) for ln in (False, True)]
    for batch in [0, -1, [1, 0], (0, 1), Slice(1)]:
        tl_batch = TLSlice(1) if isinstance(batch, Slice) else batch
        mine, tl = ours.apply_slice_to_batch_dim(batch), theirs.apply_slice_to_batch_dim(tl_batch)
        assert mine.has_batch_dim == tl.has_batch_dim
        shared = [key for key in tl.cache_dict if key in mine]  # TL's also holds computed results
        assert len(shared) >= len(mine) - 2  # mitk adds unembed.hook_in/out
        for key in shared:
            torch.testing.assert_close(mine[key], tl[key], atol=ATOL, rtol=0, msg=key)
        same_method_calls(mine, tl, [
            call for kw in variants for call in [
                ("accumulated_resid", (), dict(incl_mid=True, **kw)),
                ("decompose_resid", (1,), kw),
                ("get_full_resid_decomposition", (2,), kw),
            ]
        ])  # fmt: skip
    with torch.no_grad():  # remove_batch_dim on a batch of one, then the same methods
        tokens = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(4))
        _, one = models[0].run_with_cache(tokens)
        _, tl_one = models[1].run_with_cache(tokens)
    one.remove_batch_dim(), tl_one.remove_batch_dim()
    same_method_calls(one, tl_one, [
        call for kw in variants for call in [
            ("stack_neuron_results", (2,), dict(incl_remainder=True, **kw)),
            ("stack_head_results", (), dict(return_labels=True, **kw)),
            ("accumulated_resid", (), dict(incl_mid=True, **kw)),
        ]
    ])  # fmt: skip


# --- the documented differences, asserted ----------------------------------------------------
def test_negative_layers_count_from_the_end(caches) -> None:
    ours, _ = caches
    for negative in range(-N_LAYERS - 1, 0):
        positive = N_LAYERS + 1 + negative
        for method in ("accumulated_resid", "decompose_resid", "stack_head_results",
                       "stack_neuron_results", "get_full_resid_decomposition"):  # fmt: skip
            got, labels = getattr(ours, method)(negative, return_labels=True)
            expected, expected_labels = getattr(ours, method)(positive, return_labels=True)
            assert torch.equal(got, expected) and labels == expected_labels, (method, negative)


def test_remainder_at_layer_0_is_the_embeddings(caches) -> None:
    ours, theirs = caches
    for method in ("stack_head_results", "stack_neuron_results"):
        stack, labels = getattr(ours, method)(0, incl_remainder=True, return_labels=True)
        assert labels == ["remainder"]
        torch.testing.assert_close(stack[0], ours["resid_pre", 0], atol=0, rtol=0)
        # transformer-lens's resid_post[layer - 1] wraps to the final stream here
        tl_stack = getattr(theirs, method)(0, incl_remainder=True)
        torch.testing.assert_close(tl_stack[0], theirs["resid_post", -1])


def test_an_int_neuron_slice_keeps_the_neuron_dim(caches) -> None:
    ours, _ = caches
    one, labels = ours.stack_neuron_results(2, neuron_slice=5, return_labels=True)
    listed, listed_labels = ours.stack_neuron_results(2, neuron_slice=[5], return_labels=True)
    assert labels == listed_labels == ["L0N5", "L1N5"]
    assert torch.equal(one, listed)
    full = ours.get_neuron_results(1, neuron_slice=5, pos_slice=-1)
    for project in ("vector", "matrix"):
        direction = _projection(project)
        projected = ours.get_neuron_results(1, 5, -1, project_output_onto=direction)
        torch.testing.assert_close(projected, full @ direction, atol=ATOL, rtol=0)
