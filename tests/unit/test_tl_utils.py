"""mitk.utils against transformer_lens's: get_act_name, Slice, to_numpy, lm_cross_entropy_loss.

Parity rule for ``get_act_name``: wherever transformer-lens answers with a hook
name a mitk model has, mitk answers the same; where its answer is a name no
model has (``"hook_resid_pre"``, ``"blocks.3.hook_scale"``), mitk raises instead,
or (``"k06"``, ``kv_latent``) answers with the name meant. A short name whose
layer contradicts ``layer=`` is refused too. Also ported: the ``Slice`` tests of
transformer-lens's ``tests/unit/test_utils.py`` (TestSlice) and
``tests/unit/utilities/test_slice.py``, assertions as written; the rest of that
file needs a downloaded model or covers helpers mitk.utils does not have.
"""

from __future__ import annotations

import itertools
from typing import Any, get_args

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformer_lens.utilities import Slice as TLSlice
from transformer_lens.utilities import get_act_name as tl_get_act_name
from transformer_lens.utilities import lm_cross_entropy_loss as tl_loss
from transformer_lens.utilities import to_numpy as tl_to_numpy

from mitk import HookedTransformer, TransformerConfig
from mitk.errors import MitkError, UnknownHookError
from mitk.hooks import HookKind
from mitk.hooks import name as hook_name
from mitk.utils import Slice, get_act_name, lm_cross_entropy_loss, to_numpy
from mitk.utils import _as_int as to_python_int

KINDS = list(get_args(HookKind))
ALIASES = ["attn", "attn_logits", "key", "query", "value", "mlp_pre", "mlp_mid", "mlp_post"]
TL_ONLY = ["attn_in", "q_input", "k_input", "v_input", "mlp_in", "mid", "tokens"]
LAYER_TYPES = [None, "", "a", "m", "b", "block", "blocks", "attention", "attn", "mlp", "ln1",
               "ln2", "ln_final", "x"]  # fmt: skip


def _names_at_layer_0() -> set[str]:
    names = set()
    for kind, layer, norm in itertools.product(KINDS, [None, 0], [None, "ln1", "ln2"]):
        try:
            names.add(hook_name(kind, layer, norm))
        except ValueError:
            continue
    return names


SPELLABLE = _names_at_layer_0()


def is_mitk_name(full: str) -> bool:
    """Whether ``mitk.hooks.name`` spells ``full`` (at any layer)."""
    parts = full.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isascii() and parts[1].isdigit():
        if parts[1] != str(int(parts[1])):  # "blocks.06...": no model has it
            return False
        parts[1] = "0"
    return ".".join(parts) in SPELLABLE


def ours_or_error(*args: Any) -> str | Exception:
    try:
        return get_act_name(*args)
    except (MitkError, ValueError, KeyError) as err:
        return err


def check_parity(name: str, layer: Any, layer_type: str | None) -> None:
    theirs = tl_get_act_name(name, layer, layer_type)
    ours = ours_or_error(name, layer, layer_type)
    if layer is None and layer_type is None and ("." in name or name.startswith("hook_")):
        assert ours == theirs == name  # full names pass through
    elif is_mitk_name(theirs):
        if isinstance(ours, Exception):  # only a short name contradicting an argument
            assert isinstance(ours, ValueError) and "was passed" in str(ours), (theirs, ours)
        else:
            assert ours == theirs
    else:  # TransformerLens spelled a name no mitk model has
        assert isinstance(ours, Exception) or is_mitk_name(ours), (theirs, ours)


# --- get_act_name ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),  # the examples in transformer-lens's docstring
    [
        (("k", 6, "a"), "blocks.6.attn.hook_k"),
        (("pre", 2), "blocks.2.mlp.hook_pre"),
        (("embed",), "hook_embed"),
        (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"),
        (("k6",), "blocks.6.attn.hook_k"),
        (("scale4ln1",), "blocks.4.ln1.hook_scale"),
        (("pre5",), "blocks.5.mlp.hook_pre"),
        (("attn", 3), "blocks.3.attn.hook_pattern"),
        (("k6a",), "blocks.6.attn.hook_k"),
        (("resid_pre", 0), "blocks.0.hook_resid_pre"),
        (("scale",), "ln_final.hook_scale"),
        (("scale", 1, "ln2"), "blocks.1.ln2.hook_scale"),
        (("resid_mid", "4", "b"), "blocks.4.hook_resid_mid"),
        (("blocks.0.attn.hook_q",), "blocks.0.attn.hook_q"),
    ],
)
def test_get_act_name_examples(args: tuple, expected: str) -> None:
    assert get_act_name(*args) == expected == tl_get_act_name(*args)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("resid_pre",), ValueError, "needs a layer"),  # TL: 'hook_resid_pre'
        (("resid_pre", 3, "a"), UnknownHookError, "did you mean 'blocks.3.hook_resid_pre'"),
        (("scale", 3), ValueError, "ln1"),  # TL: 'blocks.3.hook_scale'
        (("scale", None, "ln1"), UnknownHookError, "did you mean 'ln_final.hook_scale'"),
        (("normalized", 2, "ln3"), UnknownHookError, "'blocks.2.ln3.hook_normalized'"),
        (("atn", 2), UnknownHookError, "did you mean 'attn'"),
        (("attn_in", 2), UnknownHookError, "unknown activation kind 'attn_in'"),
        (("embed", 2), ValueError, "not per layer"),
        (("k", -1), ValueError, "cache\\['resid_post', -1\\]"),
        (("k6", 3), ValueError, "'k6' says layer 6 but layer=3 was passed"),
        (("k6a", None, "m"), ValueError, "says layer_type 'a'"),
    ],
)
def test_get_act_name_refuses_names_no_model_has(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        get_act_name(*args)


def test_unknown_names_are_key_errors_with_suggestions() -> None:
    with pytest.raises(KeyError) as info:
        get_act_name("resid_psot", 1)
    assert isinstance(info.value, UnknownHookError)
    assert "resid_post" in info.value.suggestions


def test_every_name_it_builds_exists_on_a_model() -> None:
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=8)
    model = HookedTransformer(cfg, seed=0)
    calls = [
        ("embed",),
        ("resid_pre", "1"),
        ("attn0",),
        ("k1a",),
        ("q", 0),
        ("scale1ln2",),
        ("normalized",),
        ("post0",),
        ("mlp_out", 1),
        ("attn_out", 0, "b"),
        ("value", 1),
    ]
    for args in calls:
        assert get_act_name(*args) in model.hook_dict, args


def test_parity_with_transformer_lens_over_a_grid() -> None:
    layers = [None, 0, 3, 11, "3", "03", -1]
    for name, layer, layer_type in itertools.product(
        [*KINDS, *ALIASES, *TL_ONLY, "hook_embed", "blocks.1.hook_resid_pre"], layers, LAYER_TYPES
    ):
        check_parity(name, layer, layer_type)


short_names = st.builds(
    lambda kind, digits, rest: f"{kind}{digits}{rest}",
    st.sampled_from([*KINDS, *ALIASES, *TL_ONLY, "k", "q", "x", ""]),
    st.sampled_from(["", "0", "6", "06", "12"]),
    st.sampled_from(["", "a", "m", "b", "ln1", "ln2", "attn", "mlp", "block", "z", "_x"]),
)
free_text = st.text(alphabet="abeklmnopqrstvz_.01236", max_size=14)


@settings(max_examples=300, deadline=None)
@given(
    name=st.one_of(short_names, free_text),
    layer=st.one_of(st.none(), st.integers(-2, 40), st.sampled_from(["0", "7", "07", "x"])),
    layer_type=st.one_of(st.none(), st.sampled_from(LAYER_TYPES[1:])),
)
def test_parity_with_transformer_lens_on_random_short_names(
    name: str, layer: Any, layer_type: str | None
) -> None:
    check_parity(name, layer, layer_type)


# --- Slice: ported from transformer-lens's tests/unit/test_utils.py (TestSlice) ------------
ref_tensor = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
shape = ref_tensor.shape
tensor_row0_dim2 = torch.tensor([[1, 2, 3, 4, 5]])
shape_2 = tensor_row0_dim2.shape
tensor_row0_dim1 = torch.tensor([1, 2, 3, 4, 5])
shape_1 = tensor_row0_dim1.shape


class utils:  # noqa: N801 (stands in for the module the upstream tests import)
    Slice = Slice


class TestSlice:
    @pytest.mark.parametrize(
        "input_slice, expected_shape",
        [
            ([0], shape_2),
            ((1,), shape_2),
            (torch.tensor([0]), shape_2),
            (np.array([0]), shape_2),
            (0, shape_1),
            (torch.tensor(0), shape_1),
            (None, shape),
        ],
    )
    def test_modularity_shape(self, input_slice, expected_shape):
        slc = utils.Slice(input_slice=input_slice)
        sliced_tensor = slc.apply(ref_tensor)
        assert sliced_tensor.shape == expected_shape

    @pytest.mark.parametrize(
        "input_slice, expected_tensor",
        [
            ([0], tensor_row0_dim2),
            (torch.tensor([0]), tensor_row0_dim2),
            (np.array([0]), tensor_row0_dim1),
            (0, tensor_row0_dim1),
            (torch.tensor(0), tensor_row0_dim1),
            (None, ref_tensor),
        ],
    )
    def test_modularity_tensor(self, input_slice, expected_tensor):
        slc = utils.Slice(input_slice=input_slice)
        sliced_tensor = slc.apply(ref_tensor)
        assert (sliced_tensor == expected_tensor).all()

    @pytest.mark.parametrize(
        "input_slice, expected_indices",
        [
            ([0, 1], np.array([0, 1])),
            (0, np.array(0)),
            (torch.tensor(0), np.array(0)),
        ],
    )
    def test_indices(self, input_slice, expected_indices):
        slc = utils.Slice(input_slice=input_slice)
        indices = slc.indices(2)
        assert (indices == expected_indices).all()

    def test_indices_error(self):
        with pytest.raises(ValueError):
            _ = utils.Slice(input_slice=[0, 2, 5]).indices()


# --- Slice: ported from transformer-lens's tests/unit/utilities/test_slice.py ---------------
@pytest.fixture
def tensor():
    return torch.arange(24).reshape(4, 6)


@pytest.mark.parametrize(
    "scalar",
    [np.int64(2), np.int32(2), torch.tensor(2), np.array(2)],
    ids=["np-int64", "np-int32", "0d-tensor", "0d-ndarray"],
)
class TestIntLikeScalars:
    def test_init_matches_plain_int(self, scalar, tensor):
        sliced = Slice(scalar)
        assert sliced.mode == "int"
        assert sliced.slice == 2
        assert_close(sliced.apply(tensor), Slice(2).apply(tensor))

    def test_indices_matches_plain_int(self, scalar, tensor):
        np.testing.assert_array_equal(Slice(scalar).indices(), Slice(2).indices())

    def test_unwrap_matches_plain_int(self, scalar, tensor):
        unwrapped = Slice.unwrap(scalar)
        reference = Slice.unwrap(2)
        assert unwrapped.mode == reference.mode == "array"
        assert_close(unwrapped.apply(tensor), reference.apply(tensor))


def test_bool_scalars_are_not_coerced():
    assert to_python_int(True) is None
    assert to_python_int(torch.tensor(True)) is None
    assert to_python_int(np.array(True)) is None
    assert Slice(torch.tensor([True, False])).mode == "array"


def test_plain_int_unchanged(tensor):
    sliced = Slice(3)
    assert sliced.mode == "int"
    assert_close(sliced.apply(tensor), tensor[3])


# --- Slice against transformer-lens's -----------------------------------------------------
def _tl_takes(value: object) -> bool:
    """transformer-lens 3.x reads 0-d tensors/arrays as index arrays and refuses numpy ints;
    mitk reads all of them as ints, as later transformer-lens does (TestIntLikeScalars)."""
    zero_d = isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0
    return not zero_d and not isinstance(value, np.integer)


positions = st.integers(-6, 5)
slice_inputs = st.one_of(
    st.none(),
    positions,
    positions.map(np.int64),
    positions.map(torch.tensor),
    st.tuples(positions),
    st.tuples(st.one_of(st.none(), positions), st.one_of(st.none(), positions)),
    st.tuples(positions, positions, st.sampled_from([1, 2, 3, -1])),
    st.builds(slice, st.one_of(st.none(), positions), st.one_of(st.none(), positions)),
    st.lists(positions, min_size=1, max_size=5),  # transformer-lens 3.x fails on []
    st.lists(positions, min_size=1, max_size=5).map(torch.tensor),
    st.lists(positions, min_size=1, max_size=5).map(np.array),
    st.lists(st.booleans(), min_size=6, max_size=6).map(torch.tensor),
)


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except (ValueError, IndexError) as err:  # torch refuses negative steps: both must refuse
        return type(err)


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor):
        return torch.equal(ours, theirs)
    if isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray):
        return np.array_equal(ours, theirs)
    return ours == theirs


@settings(max_examples=200, deadline=None)
@given(value=slice_inputs, dim=st.sampled_from([1, -2]))
def test_slice_matches_transformer_lens(value: Any, dim: int) -> None:
    x = torch.arange(3 * 6 * 4).reshape(3, 6, 4)
    ours = Slice(value)
    if not _tl_takes(value):
        assert ours.mode == "int" and torch.equal(ours.apply(x, dim), x[:, int(value)])
        return
    theirs = TLSlice(value)
    assert ours.mode == theirs.mode
    for mine, tls in [
        (lambda: ours.apply(x, dim), lambda: theirs.apply(x, dim)),
        (lambda: ours.indices(6), lambda: theirs.indices(6)),
        (lambda: Slice.unwrap(value).apply(x, dim), lambda: TLSlice.unwrap(value).apply(x, dim)),
    ]:
        assert _same(_outcome(mine), _outcome(tls))


def test_slice_refuses_what_it_cannot_read() -> None:
    for bad in [True, "0", 1.5, (), (1, 2, 3, 4)]:
        with pytest.raises(ValueError, match="cannot make a Slice"):
            Slice(bad)  # type: ignore[arg-type]
    assert Slice([]).apply(torch.arange(4)).shape == (0,)
    assert "mode='int'" in repr(Slice(3))


# --- to_numpy and lm_cross_entropy_loss --------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
        torch.randn(2, generator=torch.Generator().manual_seed(1), requires_grad=True),
        torch.ones(2).bfloat16(),
        [1, 2],
        (1.5, 2.5),
        3,
        2.0,
        True,
        "x",
        np.arange(3),
    ],
    ids=repr,
)
def test_to_numpy_matches_transformer_lens(value: object) -> None:
    ours, theirs = to_numpy(value), tl_to_numpy(value)
    assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError):
        to_numpy({"a": 1})


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_lm_cross_entropy_loss_matches_transformer_lens(per_token: bool, masked: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    tokens = torch.randint(0, 11, (3, 7), generator=gen)
    mask = None
    if masked:
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, :2] = 0  # left padding
        mask[2, 5:] = 0  # right padding
    ours = lm_cross_entropy_loss(logits, tokens, mask, per_token=per_token)
    theirs = tl_loss(logits, tokens, mask, per_token=per_token)
    assert ours.shape == theirs.shape
    assert_close(ours, theirs)
    with pytest.raises(AssertionError, match="same shape"):  # a ShapeMismatchError, as TL asserts
        lm_cross_entropy_loss(logits, tokens, torch.ones(3, 6))
