"""TransformerLens's hook API on mitk: add_hook, permanent hooks, reset semantics, handles.

The first two sections port TransformerLens's own unit tests (``tests/unit/test_hook_points.py``
and ``tests/unit/test_hooks.py``) with their assertions as written; only model construction
changed (TransformerLens loads ``solu-1l``; here the random 3-layer GPT-2 of ``conftest.py``
with its word tokenizer). Tests that cannot pass because of a documented difference are
marked with the reason. The rest pins what mitk adds or keeps on purpose: names are
validated, a pattern hook makes its layer run the explicit path, backward hooks may return
``(grad,)``, and a hypothesis test checks add/remove/reset against a reference model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from mitk import EncoderDecoderConfig, HookedEncoderDecoder, HookedTransformer, TransformerConfig
from mitk.errors import HookError, ShapeMismatchError, UnknownHookError
from mitk.hooks import HookHandle, HookPoint, layer_of

# --- ported: TransformerLens tests/unit/test_hook_points.py ----------------------------


def setup_hook_point_and_hook():
    hook_point = HookPoint()

    def hook(activation, hook):
        return activation

    return hook_point, hook


def test_add_hook_forward():
    hook_point, hook = setup_hook_point_and_hook()
    hook_point.add_hook(hook, dir="fwd")
    assert len(hook_point.fwd_hooks) == 1


def test_add_hook_backward():
    hook_point, hook = setup_hook_point_and_hook()
    hook_point.add_hook(hook, dir="bwd")
    assert len(hook_point.bwd_hooks) == 1


def test_add_hook_permanent():
    hook_point, hook = setup_hook_point_and_hook()
    hook_point.add_hook(hook, dir="fwd", is_permanent=True)
    assert hook_point.fwd_hooks[0].is_permanent


def test_add_hook_with_level():
    hook_point, hook = setup_hook_point_and_hook()
    hook_point.add_hook(hook, dir="fwd", level=5)
    assert hook_point.fwd_hooks[0].context_level == 5


def test_add_hook_prepend():
    # TransformerLens mocks torch's RemovableHandle ids to see the order; mitk's handles keep
    # the user's function, so the order is read from that instead (same assertion).
    hook_point, _ = setup_hook_point_and_hook()

    def hook1(activation, hook):
        return activation

    def hook2(activation, hook):
        return activation

    hook_point.add_hook(hook1, dir="fwd")
    hook_point.add_hook(hook2, dir="fwd", prepend=True)

    assert len(hook_point.fwd_hooks) == 2
    assert hook_point.fwd_hooks[0].user_hook is hook2
    assert hook_point.fwd_hooks[1].user_hook is hook1


@pytest.mark.skip(reason="documented difference: mitk's HookPoint has no hook_conversion")
def test_enable_reshape():
    """TransformerLens's enable_reshape/hook_conversion (TransformerBridge plumbing)."""


class TestHookPointHasHooks:
    """Comprehensive test suite for HookPoint.has_hooks method."""

    def setup_method(self):
        """Set up fresh HookPoint and sample hook for each test."""
        self.hook_point = HookPoint()

        def sample_hook(activation, hook):
            return activation

        self.sample_hook = sample_hook

    def test_no_hooks_returns_false(self):
        assert not self.hook_point.has_hooks()
        assert not self.hook_point.has_hooks(dir="fwd")
        assert not self.hook_point.has_hooks(dir="bwd")
        assert not self.hook_point.has_hooks(dir="both")

    def test_forward_hook_detection(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd")
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(dir="fwd")
        assert self.hook_point.has_hooks(dir="both")
        assert not self.hook_point.has_hooks(dir="bwd")

    def test_backward_hook_detection(self):
        self.hook_point.add_hook(self.sample_hook, dir="bwd")
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(dir="bwd")
        assert self.hook_point.has_hooks(dir="both")
        assert not self.hook_point.has_hooks(dir="fwd")

    def test_both_direction_hooks(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd")
        self.hook_point.add_hook(self.sample_hook, dir="bwd")
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(dir="fwd")
        assert self.hook_point.has_hooks(dir="bwd")
        assert self.hook_point.has_hooks(dir="both")

    def test_permanent_hook_detection(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=True)
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(including_permanent=True)
        assert not self.hook_point.has_hooks(including_permanent=False)

    def test_non_permanent_hook_detection(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=False)
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(including_permanent=True)
        assert self.hook_point.has_hooks(including_permanent=False)

    def test_mixed_permanent_hooks(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=True)
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=False)
        assert self.hook_point.has_hooks(including_permanent=True)
        assert self.hook_point.has_hooks(including_permanent=False)

    def test_only_permanent_hooks(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=True)
        self.hook_point.add_hook(self.sample_hook, dir="bwd", is_permanent=True)
        assert self.hook_point.has_hooks(including_permanent=True)
        assert self.hook_point.has_hooks(dir="fwd", including_permanent=True)
        assert self.hook_point.has_hooks(dir="bwd", including_permanent=True)
        assert not self.hook_point.has_hooks(including_permanent=False)
        assert not self.hook_point.has_hooks(dir="fwd", including_permanent=False)
        assert not self.hook_point.has_hooks(dir="bwd", including_permanent=False)

    def test_context_level_filtering(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0)
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=1)
        self.hook_point.add_hook(self.sample_hook, dir="bwd", level=2)
        assert self.hook_point.has_hooks(level=0)
        assert self.hook_point.has_hooks(level=1)
        assert self.hook_point.has_hooks(level=2)
        assert not self.hook_point.has_hooks(level=3)
        assert not self.hook_point.has_hooks(level=-1)
        assert self.hook_point.has_hooks(level=None)

    def test_context_level_with_direction(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0)
        self.hook_point.add_hook(self.sample_hook, dir="bwd", level=1)
        assert self.hook_point.has_hooks(dir="fwd", level=0)
        assert self.hook_point.has_hooks(dir="bwd", level=1)
        assert not self.hook_point.has_hooks(dir="fwd", level=1)
        assert not self.hook_point.has_hooks(dir="bwd", level=0)

    def test_context_level_with_permanent_flags(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0, is_permanent=True)
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=1, is_permanent=False)
        assert self.hook_point.has_hooks(level=0, including_permanent=True)
        assert not self.hook_point.has_hooks(level=0, including_permanent=False)
        assert self.hook_point.has_hooks(level=1, including_permanent=True)
        assert self.hook_point.has_hooks(level=1, including_permanent=False)

    def test_all_parameters_combined(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0, is_permanent=True)
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=1, is_permanent=False)
        self.hook_point.add_hook(self.sample_hook, dir="bwd", level=0, is_permanent=False)
        self.hook_point.add_hook(self.sample_hook, dir="bwd", level=2, is_permanent=True)
        assert self.hook_point.has_hooks(dir="fwd", level=0, including_permanent=True)
        assert not self.hook_point.has_hooks(dir="fwd", level=0, including_permanent=False)
        assert self.hook_point.has_hooks(dir="fwd", level=1, including_permanent=False)
        assert self.hook_point.has_hooks(dir="bwd", level=0, including_permanent=False)
        assert not self.hook_point.has_hooks(dir="bwd", level=1, including_permanent=False)
        assert self.hook_point.has_hooks(dir="bwd", level=2, including_permanent=True)

    def test_invalid_direction_raises_error(self):
        # TransformerLens expects beartype's BeartypeCallHintParamViolation. mitk raises
        # HookError (a ValueError) itself; under this suite's jaxtyping/beartype import hook the
        # annotation check may get there first with a TypeError. Either way it refuses.
        with pytest.raises((HookError, TypeError)):
            self.hook_point.has_hooks(dir="invalid")  # type: ignore

    def test_multiple_hooks_same_criteria(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0, is_permanent=False)
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0, is_permanent=False)
        self.hook_point.add_hook(self.sample_hook, dir="fwd", level=0, is_permanent=False)
        assert self.hook_point.has_hooks(dir="fwd", level=0, including_permanent=False)

    def test_hook_removal_affects_detection(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd")
        assert self.hook_point.has_hooks()
        self.hook_point.remove_hooks(dir="both")
        assert not self.hook_point.has_hooks()

    def test_default_parameter_values(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=True, level=0)
        self.hook_point.add_hook(self.sample_hook, dir="bwd", is_permanent=False, level=1)
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(dir="both", including_permanent=True, level=None)

    def test_edge_case_empty_after_filtering(self):
        self.hook_point.add_hook(self.sample_hook, dir="fwd", is_permanent=True, level=5)
        assert not self.hook_point.has_hooks(including_permanent=False)
        assert not self.hook_point.has_hooks(dir="bwd")
        assert not self.hook_point.has_hooks(level=0)
        assert not self.hook_point.has_hooks(dir="bwd", level=5, including_permanent=True)

    def test_functional_hook_execution_still_works(self):
        results = []

        def test_hook(activation, hook):
            results.append("hook_called")
            return activation

        self.hook_point.add_hook(test_hook, dir="fwd")
        assert self.hook_point.has_hooks()
        test_input = torch.tensor([1.0, 2.0, 3.0])
        output = self.hook_point(test_input)
        assert torch.equal(output, test_input)
        assert "hook_called" in results

    def test_hook_point_with_conversions(self):
        def simple_hook(activation, hook):
            return activation * 2

        self.hook_point.add_hook(simple_hook, dir="fwd")
        assert self.hook_point.has_hooks()
        assert self.hook_point.has_hooks(dir="fwd")
        test_input = torch.tensor([1.0, 2.0])
        output = self.hook_point(test_input)
        expected = torch.tensor([2.0, 4.0])
        assert torch.allclose(output, expected)


# --- ported: TransformerLens tests/unit/test_hooks.py -----------------------------------

prompt = "the cat sat on a mat"
embed = lambda name: name == "hook_embed"  # noqa: E731


@pytest.fixture
def model(gpt2: HookedTransformer) -> Iterator[HookedTransformer]:
    """The shared random GPT-2; whatever a test leaves attached is removed after it."""
    yield gpt2
    gpt2.reset_hooks(including_permanent=True)


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


def test_hook_attaches_normally(model):
    c = Counter()
    _ = model.run_with_hooks(prompt, fwd_hooks=[(embed, c.inc)])
    assert all([len(hp.fwd_hooks) == 0 for _, hp in model.hook_dict.items()])
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_perma_hook_attaches_normally(model):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    model.run_with_hooks(prompt, fwd_hooks=[])
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_hook_context_manager(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        model.forward(prompt)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_nested_hook_context_manager(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        model.forward(prompt)
        assert c.count == 1
        with model.hooks(fwd_hooks=[(embed, c.inc)]):
            assert len(model.hook_dict["hook_embed"].fwd_hooks) == 2
            model.forward(prompt)
            assert c.count == 3  # 2 from outer, 1 from inner
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert c.count == 3
    model.remove_all_hook_fns(including_permanent=True)


def test_context_manager_run_with_cache(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        model.run_with_cache(prompt)
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert c.count == 1
    model.remove_all_hook_fns(including_permanent=True)


def test_hook_context_manager_with_permanent_hook(model):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 2
        model.forward(prompt)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
    assert c.count == 2  # 1 from permanent, 1 from context manager
    model.remove_all_hook_fns(including_permanent=True)


def test_nested_context_manager_with_failure(model):
    def fail_hook(z, hook):
        raise ValueError("fail")

    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        with pytest.raises(ValueError), model.hooks(fwd_hooks=[(embed, fail_hook)]):
            assert len(model.hook_dict["hook_embed"].fwd_hooks) == 2
            model.forward(prompt)
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        assert c.count == 1
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    model.remove_all_hook_fns(including_permanent=True)


def test_reset_hooks_in_context_manager(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1
        model.reset_hooks()
        assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0
    model.remove_all_hook_fns(including_permanent=True)


def test_remove_hook(model):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1  # 1 after adding
    model.remove_all_hook_fns()
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 1  # permanent not removed without flag
    model.remove_all_hook_fns(including_permanent=True)
    assert len(model.hook_dict["hook_embed"].fwd_hooks) == 0  # removed now
    model.run_with_hooks(prompt, fwd_hooks=[])
    assert c.count == 0
    model.remove_all_hook_fns(including_permanent=True)


@pytest.mark.skip(
    reason="documented difference: hook_result needs no flag (set_use_attn_result is accepted "
    "and does nothing; the hook is built when asked), and set_use_split_qkv_input / "
    "set_use_hook_mlp_in / set_use_attn_in raise naming the hook to use instead, so TL's "
    "'AssertionError while the flag is off' cannot hold (docs/coming_from_transformer_lens.md)"
)
def test_conditional_hooks():
    """TransformerLens: hook_result / hook_q_input exist only behind global flags."""


def test_prepending_hooks(model):
    """Two hooks on the last residual: zeros and noise; prepend order decides which wins.

    TransformerLens compares with ``model.unembed.b_U`` because its solu-1l has folded
    LayerNorms; on this unfolded random GPT-2 the logits of a zero residual are
    ``unembed(ln_final(0))``, computed below. Otherwise as TransformerLens wrote it.
    """

    def set_to_zero(z, hook):
        z[:] = 0.0
        return z

    def set_to_randn(z, hook):
        z = torch.randn_like(z) * 0.1
        return z

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        zero_logits = model.unembed(model.ln_final(torch.zeros(1, 5, model.cfg.d_model)))
    for zero_attach_pos in range(2):
        model.reset_hooks()

        for hook_idx in range(2):
            model.add_hook(
                last, set_to_zero if hook_idx == zero_attach_pos else set_to_randn, prepend=True
            )

        logits = model(torch.arange(5)[None, :])
        # zero_attach_pos==0: the zero hook went on first and the noise hook was prepended
        # before it, so zeros win and the logits are those of a zero residual.
        assert torch.allclose(logits, zero_logits) == (zero_attach_pos == 0)


# --- mitk: add_hook keeps hooks until removed; permanence and reset ---------------------

RESID = "blocks.0.hook_resid_pre"


def counting(log: list[str]) -> Callable[[torch.Tensor, HookPoint], None]:
    def hook(act: torch.Tensor, point: HookPoint) -> None:
        log.append(point.name)

    return hook


def test_add_hook_stays_until_removed(tiny: HookedTransformer, tokens: torch.Tensor) -> None:
    log: list[str] = []
    tiny.add_hook(RESID, counting(log))
    tiny(tokens[:, :8] % 50)
    tiny(tokens[:, :8] % 50)
    assert log == [RESID, RESID]
    tiny.reset_hooks()
    tiny(tokens[:, :8] % 50)
    assert log == [RESID, RESID]
    assert not any(p.has_hooks for p in tiny.hook_dict.values())


def test_reset_keeps_permanent_hooks_by_default(tiny: HookedTransformer) -> None:
    temp, perma = counting([]), counting([])
    tiny.add_hook(RESID, temp)
    tiny.add_perma_hook(RESID, perma)
    tiny.add_hook("hook_embed", temp, dir="bwd", is_permanent=True)
    tiny.reset_hooks()
    point = tiny.hook_dict[RESID]
    assert [h.user_hook for h in point.fwd_hooks] == [perma]
    assert [h.is_permanent for h in point.fwd_hooks] == [True]
    assert tiny.hook_dict["hook_embed"].has_hooks(dir="bwd")
    # the old meaning of reset_hooks() (detach everything) is one argument away
    tiny.reset_hooks(including_permanent=True)
    assert not any(p.has_hooks for p in tiny.hook_dict.values())


def test_reset_and_remove_by_direction(tiny: HookedTransformer) -> None:
    fwd, bwd = counting([]), counting([])
    tiny.add_hook(RESID, fwd)
    tiny.add_hook(RESID, bwd, dir="bwd")
    point = tiny.hook_dict[RESID]
    tiny.reset_hooks(direction="bwd")
    assert [h.user_hook for h in point.fwd_hooks] == [fwd] and point.bwd_hooks == []
    tiny.add_hook(RESID, bwd, dir="bwd")
    tiny.remove_all_hook_fns(direction="fwd")
    assert point.fwd_hooks == [] and [h.user_hook for h in point.bwd_hooks] == [bwd]
    # HookPoint.remove_hooks: TransformerLens's default direction is "fwd"
    point.add_hook(fwd)
    point.remove_hooks()
    assert point.fwd_hooks == [] and len(point.bwd_hooks) == 1
    point.add_hook(fwd, is_permanent=True)
    point.remove_hooks("both")
    assert [h.user_hook for h in point.fwd_hooks] == [fwd] and point.bwd_hooks == []
    point.remove_hooks("both", including_permanent=True)
    assert not point.has_hooks


def test_level_tags_filter_removal(tiny: HookedTransformer) -> None:
    a, b = counting([]), counting([])
    tiny.add_hook(RESID, a, level=1)
    tiny.add_hook(RESID, b, level=2)
    tiny.reset_hooks(level=1)
    assert [h.user_hook for h in tiny.hook_dict[RESID].fwd_hooks] == [b]


def test_prepend_fires_first(tiny: HookedTransformer) -> None:
    order: list[str] = []
    first = lambda a, h: order.append("first")  # noqa: E731
    second = lambda a, h: order.append("second")  # noqa: E731
    tiny.add_hook(RESID, second)
    tiny.add_hook(RESID, first, prepend=True)
    with tiny.hooks(fwd_hooks=[(RESID, lambda a, h: order.append("context"))]):
        tiny(torch.randint(0, 50, (1, 4)))
    assert order == ["first", "second", "context"]


def test_handles_list_context_hooks_and_remove(tiny: HookedTransformer) -> None:
    mine, theirs = counting([]), counting([])
    point = tiny.hook_dict[RESID]
    tiny.add_hook(RESID, mine)
    with tiny.hooks(fwd_hooks=[(RESID, theirs)]):
        handles = point.fwd_hooks
        assert [h.user_hook for h in handles] == [mine, theirs]
        assert all(isinstance(h, HookHandle) and not h.is_permanent for h in handles)
        handles[1].remove()  # a context's hook can be removed early; its exit then does nothing
        assert [h.user_hook for h in point.fwd_hooks] == [mine]
    handles[0].hook.remove()  # TransformerLens spells it handle.hook.remove()
    handles[0].remove()  # removing twice is a no-op
    assert point.fwd_hooks == []


def test_context_exit_leaves_add_hook_hooks(tiny: HookedTransformer) -> None:
    """The same function added both ways: the context removes only its own registration."""
    fn = counting([])
    tiny.add_hook(RESID, fn)
    with tiny.hooks(fwd_hooks=[(RESID, fn)]):
        assert len(tiny.hook_dict[RESID].fwd_hooks) == 2
    assert [h.user_hook for h in tiny.hook_dict[RESID].fwd_hooks] == [fn]
    assert not tiny.hook_dict[RESID].fwd_hooks[0].is_permanent


def test_has_hooks_reads_as_property_and_method(tiny: HookedTransformer) -> None:
    point = tiny.hook_dict[RESID]
    assert not point.has_hooks and point.has_hooks == False  # noqa: E712
    point.add_perma_hook(counting([]))
    assert point.has_hooks and point.has_hooks == True  # noqa: E712
    assert point.has_hooks() and not point.has_hooks(including_permanent=False)
    assert repr(point.has_hooks) == "True"
    point.clear()


# --- mitk: names are validated; hooks that cannot fire are errors ------------------------


def test_unknown_names_raise_with_suggestions_and_attach_nothing(tiny: HookedTransformer) -> None:
    with pytest.raises(UnknownHookError, match=r"did you mean 'blocks\.0\.hook_resid_pre'"):
        tiny.add_hook("blocks.0.hook_resid_prx", counting([]))
    with pytest.raises(UnknownHookError, match="did you mean"):
        tiny.add_perma_hook(["hook_embed", "blocks.1.attn.hook_patern"], counting([]))
    with pytest.raises(KeyError):  # UnknownHookError is a KeyError, as TL's mod_dict lookup
        tiny.add_hook("blocks.0.hook_resid_prx", counting([]), dir="bwd")
    with pytest.raises(HookError, match="matched no hook"):
        tiny.add_hook(lambda n: "rot_q" in n, counting([]))
    with pytest.raises((HookError, TypeError)):
        tiny.add_hook(lambda n: True, counting([]), dir="sideways")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # mitk's "not callable" (or the suite's annotation check)
        tiny.add_hook(RESID, "not a function")  # type: ignore[arg-type]
    with pytest.raises((HookError, TypeError)):  # None selects every hook in names_filter only
        tiny.add_hook(None, counting([]))  # type: ignore[arg-type]
    assert not any(p.has_hooks for p in tiny.hook_dict.values())


def test_predicate_attaches_to_every_match(tiny: HookedTransformer) -> None:
    log: list[str] = []
    tiny.add_hook(lambda n: n.endswith("hook_resid_pre"), counting(log))
    tiny(torch.randint(0, 50, (1, 4)))
    assert log == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_pattern_hook_from_add_hook_switches_that_layer_to_eager(
    tiny: HookedTransformer,
) -> None:
    tokens = torch.randint(0, 50, (2, 6))
    clean = tiny(tokens)
    assert tiny.attention_paths() == ["sdpa", "sdpa"]
    seen: list[tuple[int, ...]] = []
    tiny.add_perma_hook("blocks.1.attn.hook_pattern", lambda p, h: seen.append(tuple(p.shape)))
    tiny.reset_hooks()  # a permanent hook survives, so the layer stays explicit
    out = tiny(tokens)
    paths = tiny.attention_paths()
    assert paths[0] == "sdpa" and paths[1] == "eager: hooked blocks.1.attn.hook_pattern"
    assert seen == [(2, 4, 6, 6)]
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=0)
    with tiny.backend("sdpa"), pytest.raises(HookError, match="cannot fire"):
        tiny(tokens)  # forcing the fused kernel never skips an attached pattern hook
    tiny.reset_hooks(including_permanent=True)
    tiny(tokens)
    assert tiny.attention_paths() == ["sdpa", "sdpa"]


def test_encoder_decoder_shares_the_api() -> None:
    cfg = EncoderDecoderConfig(
        d_model=16, n_heads=2, d_head=8, d_mlp=32, n_layers=2, n_decoder_layers=2, d_vocab=30
    )
    model = HookedEncoderDecoder(cfg)
    enc, dec = torch.randint(0, 30, (2, 6)), torch.randint(0, 30, (2, 4))
    layers: list[int] = []
    model.add_perma_hook("decoder.1.cross_attn.hook_pattern", lambda p, h: layers.append(h.layer()))
    model.add_hook("encoder.0.attn.hook_pattern", lambda p, h: layers.append(h.layer()))
    model(enc, dec)
    assert layers == [0, 1]
    paths = model.attention_paths()
    assert paths["encoder.0.attn"].startswith("eager") and paths["encoder.1.attn"] == "sdpa"
    assert paths["decoder.1.cross_attn"].startswith("eager")
    model.reset_hooks()
    assert [n for n, p in model.hook_dict.items() if p.has_hooks] == [
        "decoder.1.cross_attn.hook_pattern"
    ]
    with pytest.raises(UnknownHookError, match="did you mean"):
        model.add_hook("encoder.0.attn.hook_patern", lambda p, h: None)


def test_backward_hook_under_no_grad_is_an_error(tiny: HookedTransformer) -> None:
    """Documented difference: TransformerLens skips it silently; mitk refuses to run."""
    tiny.add_hook(RESID, counting([]), dir="bwd")
    with torch.no_grad(), pytest.raises(HookError, match="cannot fire"):
        tiny(torch.randint(0, 50, (1, 4)))


def test_layer_parses_the_block_index(gpt2: HookedTransformer) -> None:
    assert gpt2.hook_dict["blocks.2.attn.hook_z"].layer() == 2
    assert gpt2.hook_dict["blocks.0.ln1.hook_scale"].layer() == 0
    for name, point in gpt2.hook_dict.items():
        assert point.name == name
        if layer_of(name) is not None:
            assert point.layer() == layer_of(name)
        else:
            with pytest.raises(ValueError, match="no layer index"):
                point.layer()
    with pytest.raises(HookError):
        HookPoint().layer()  # unnamed, as TransformerLens raises for name None


# --- mitk: backward hooks may return (grad,) -------------------------------------------


def grad_at(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """d loss / d embedding weights with whatever hooks are attached."""
    model.zero_grad()
    model(tokens, return_type="loss").backward()
    grad = model.embed.W_E.grad
    assert grad is not None
    return grad.clone()


@pytest.mark.parametrize("wrap", [lambda g: g, lambda g: (g,)], ids=["tensor", "tuple"])
def test_backward_hooks_replace_the_gradient(tiny: HookedTransformer, wrap: Any) -> None:
    tokens = torch.randint(0, 50, (2, 6))
    clean = grad_at(tiny, tokens)
    seen: list[torch.Tensor] = []

    def double(grad: torch.Tensor, hook: HookPoint) -> Any:
        seen.append(grad)
        return wrap(grad * 2)

    tiny.add_hook(RESID, double, dir="bwd")
    doubled = grad_at(tiny, tokens)
    torch.testing.assert_close(doubled, 2 * clean)
    assert len(seen) == 1 and seen[0].shape == (2, 6, tiny.cfg.d_model)
    # still attached: it fires on the next backward too (add_hook hooks stay until removed)
    grad_at(tiny, tokens)
    assert len(seen) == 2
    tiny.reset_hooks()
    torch.testing.assert_close(grad_at(tiny, tokens), clean)


def test_backward_hook_tuples_are_checked(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 4))
    tiny.add_hook(RESID, lambda g, h: (g, g), dir="bwd")
    with pytest.raises(HookError, match="tuple of 2"):
        tiny(tokens, return_type="loss").backward()
    tiny.reset_hooks()
    tiny.add_hook(RESID, lambda g, h: (g[:, :2],), dir="bwd")
    with pytest.raises(ShapeMismatchError, match="returned shape"):
        tiny(tokens, return_type="loss").backward()
    tiny.reset_hooks()
    tiny.add_hook(RESID, lambda g, h: (None,), dir="bwd")
    with pytest.raises(HookError, match=r"tuple of 1 \(NoneType\)"):
        tiny(tokens, return_type="loss").backward()


def test_run_with_hooks_accepts_tuple_returning_bwd_hooks(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 5))
    clean = grad_at(tiny, tokens)
    tiny.zero_grad()
    loss = tiny.run_with_hooks(
        tokens, return_type="loss", bwd_hooks=[(RESID, lambda g, h: (3 * g,))]
    )
    loss.backward()
    assert tiny.embed.W_E.grad is not None
    torch.testing.assert_close(tiny.embed.W_E.grad, 3 * clean)


# --- hypothesis: add / remove / reset against a reference model --------------------------

# few names, so that operations often meet the same hook point
NAMES = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "ln_final.hook_scale"]
DIRS = ["fwd", "bwd"]
BOTH = ["fwd", "bwd", "both"]


@dataclass
class Ref:
    """What should be attached: per (name, dir), (hook id, permanent, level) in firing order."""

    hooks: dict[tuple[str, str], list[tuple[int, bool, int | None]]]

    def remove(self, name: str, dirs: str, including_permanent: bool, level: int | None) -> None:
        for d in DIRS:
            if dirs in (d, "both"):
                self.hooks[name, d] = [
                    h
                    for h in self.hooks[name, d]
                    if not including_permanent and (h[1] or (level is not None and h[2] != level))
                ]


add_op = st.tuples(
    st.just("add"),
    st.sets(st.sampled_from(NAMES), min_size=1, max_size=2),
    st.sampled_from(DIRS),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 1]),
)
ops = st.one_of(
    add_op,
    add_op,  # twice as likely as the rest, so that removals have something to remove
    st.tuples(
        st.just("remove_hooks"),
        st.sampled_from(NAMES),
        st.sampled_from(BOTH),
        st.booleans(),
        st.sampled_from([None, 1]),
    ),
    st.tuples(st.just("reset"), st.sampled_from(BOTH), st.booleans(), st.sampled_from([None, 1])),
    st.tuples(st.just("remove_all"), st.sampled_from(BOTH), st.booleans()),
    st.tuples(
        st.just("handle_remove"), st.sampled_from(NAMES), st.sampled_from(DIRS), st.integers(0, 3)
    ),
)


ONE_LAYER = HookedTransformer(
    TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=50, n_ctx=8), seed=0
)


@settings(max_examples=40, deadline=None)
@given(sequence=st.lists(ops, min_size=2, max_size=12))
def test_add_remove_reset_match_a_reference(sequence: list) -> None:
    tiny = ONE_LAYER
    tiny.reset_hooks(including_permanent=True)
    ref = Ref({(n, d): [] for n in NAMES for d in DIRS})
    fired: list[tuple[str, str, int]] = []

    def make(k: int, d: str) -> Callable[[torch.Tensor, HookPoint], None]:
        return lambda x, point: fired.append((point.name, d, k))

    fns: dict[int, Any] = {}
    for k, op in enumerate(sequence):
        if op[0] == "add":
            _, names, d, permanent, prepend, level = op
            fns[k] = make(k, d)
            selector = sorted(names) if len(names) > 1 else next(iter(names))
            tiny.add_hook(selector, fns[k], d, is_permanent=permanent, level=level, prepend=prepend)
            for n in names:
                entries = ref.hooks[n, d]
                entries.insert(0 if prepend else len(entries), (k, permanent, level))
        elif op[0] == "remove_hooks":
            _, n, dirs, incl, level = op
            tiny.hook_dict[n].remove_hooks(dirs, including_permanent=incl, level=level)
            ref.remove(n, dirs, incl, level)
        elif op[0] == "reset":
            _, dirs, incl, level = op
            tiny.reset_hooks(direction=dirs, including_permanent=incl, level=level)
            for n in NAMES:
                ref.remove(n, dirs, incl, level)
        elif op[0] == "remove_all":
            _, dirs, incl = op
            tiny.remove_all_hook_fns(dirs, including_permanent=incl)
            for n in NAMES:
                ref.remove(n, dirs, incl, None)
        else:
            _, n, d, index = op
            handles = getattr(tiny.hook_dict[n], f"{d}_hooks")
            if handles:
                handles[index % len(handles)].remove()
                del ref.hooks[n, d][index % len(handles)]
        for (n, d), expected in ref.hooks.items():
            handles = getattr(tiny.hook_dict[n], f"{d}_hooks")
            got = [(h.user_hook, h.is_permanent, h.context_level) for h in handles]
            assert got == [(fns[k], p, lv) for k, p, lv in expected]
    attached = {n for (n, _), hooks in ref.hooks.items() if hooks}
    assert {n for n, p in tiny.hook_dict.items() if p.has_hooks} == attached

    # every attached hook fires once, forward ones in model order then attachment order,
    # backward ones once per backward, in attachment order within a hook point
    tiny(torch.randint(0, 50, (1, 4)), return_type="loss").backward()
    fwd = [(n, "fwd", k) for n in NAMES for k, _, _ in ref.hooks[n, "fwd"]]
    assert [f for f in fired if f[1] == "fwd"] == fwd
    for n in NAMES:
        assert [k for name, d, k in fired if name == n and d == "bwd"] == [
            k for k, _, _ in ref.hooks[n, "bwd"]
        ]
    pattern_hooked = (
        ref.hooks["blocks.0.attn.hook_pattern", "fwd"]
        or ref.hooks["blocks.0.attn.hook_pattern", "bwd"]
    )
    assert tiny.attention_paths()[0].startswith("eager") == bool(pattern_hooked)
    tiny.reset_hooks(including_permanent=True)
