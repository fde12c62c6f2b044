"""A hook's replacement must match its activation's dtype, device and shape, or fail by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch import Tensor

from mitk import HookedTransformer, TransformerConfig
from mitk.config import MoEConfig
from mitk.errors import HookError, HookReplacementError
from mitk.hooks import HookPoint, name

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
          torch.bool, torch.complex64]  # fmt: skip


def _dense() -> HookedTransformer:
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=11, n_ctx=8)
    return HookedTransformer(cfg, seed=0)


def _moe() -> HookedTransformer:
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=6)
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=11, n_ctx=8,
                            act_fn="silu", normalization="rmsnorm", moe=moe)  # fmt: skip
    return HookedTransformer(cfg, seed=0)


MODELS = {"dense": _dense(), "moe": _moe()}


def _fired(model: HookedTransformer) -> list[str]:
    """Every hook point a forward of ``TOKENS`` reaches (derived ones fire when hooked)."""
    seen: list[str] = []
    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: True, lambda a, h: seen.append(h.name))])
    return sorted(set(seen))


FIRED = {kind: _fired(model) for kind, model in MODELS.items()}


def _other_dtype(act: Tensor, choice: int) -> torch.dtype:
    others = [d for d in DTYPES if d != act.dtype]
    return others[choice % len(others)]


# what a wrong hook returns, given the activation: (label, maker)
WRONG: dict[str, Callable[[Tensor, int], Any]] = {
    "dtype": lambda act, i: act.detach().to(_other_dtype(act, i)),
    "meta": lambda act, i: act.detach().to("meta"),
    "list": lambda act, i: act.tolist(),
    "numpy": lambda act, i: act.detach().numpy(),
    "str": lambda act, i: "activation",
    "tuple": lambda act, i: (act,),
    "int": lambda act, i: i,
    "none-in-tuple": lambda act, i: (None,),
}


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(sorted(MODELS)),
    pick=st.integers(0, 10**6),
    wrong=st.sampled_from(sorted(WRONG)),
    choice=st.integers(0, len(DTYPES)),
)
def test_a_wrong_replacement_fails_at_the_hook_point_by_name(
    kind: str, pick: int, wrong: str, choice: int
) -> None:
    model = MODELS[kind]
    hook_name = FIRED[kind][pick % len(FIRED[kind])]
    seen: dict[str, Any] = {}

    def bad_hook(act: Tensor, hook: HookPoint) -> Any:
        seen["act"], seen["out"] = act, WRONG[wrong](act, choice)
        return seen["out"]

    with torch.no_grad(), pytest.raises(HookError) as raised:
        model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, bad_hook)])
    assert isinstance(raised.value, HookReplacementError)
    message = str(raised.value)
    act, out = seen["act"], seen["out"]
    assert f"forward hook on {hook_name!r}" in message
    expected = f"dtype {act.dtype}, device {act.device}, shape {tuple(act.shape)}"
    assert f"expected {expected}" in message or f"({expected})" in message, message
    if isinstance(out, Tensor):
        assert f"received dtype {out.dtype}, device {out.device}, shape {tuple(out.shape)}" in (
            message
        )
        differs = "dtype" if out.dtype != act.dtype else "device"
        got, want = (out.dtype, act.dtype) if differs == "dtype" else (out.device, act.device)
        assert f"{differs} {got}, expected {want}" in message, message
    else:
        assert f"returned {type(out).__name__};" in message, message
    assert not any(p.has_hooks for p in model.hook_dict.values())


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(sorted(MODELS)), pick=st.integers(0, 10**6))
def test_a_replacement_of_the_same_kind_is_used_at_every_hook_point(kind: str, pick: int) -> None:
    """Same dtype, device and shape pass, integer activations (expert indices) included."""
    model = MODELS[kind]
    hook_name = FIRED[kind][pick % len(FIRED[kind])]
    with torch.no_grad():
        clean = model(TOKENS)
        same = model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, lambda a, h: a.clone())])
    torch.testing.assert_close(same, clean)  # hooking a pattern may switch to explicit attention


def test_integer_rerouting_keeps_working_and_other_integer_widths_are_refused() -> None:
    model, point = MODELS["moe"], name("expert_indices", 0)

    def route(dtype: torch.dtype) -> Callable[[Tensor, HookPoint], Tensor]:
        return lambda act, hook: torch.tensor([3, 0], dtype=dtype).expand_as(act).clone()

    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[(point, route(torch.int64))])
        with pytest.raises(HookError, match=r"dtype torch.int32, expected torch.int64"):
            model.run_with_hooks(TOKENS, fwd_hooks=[(point, route(torch.int32))])


def test_a_backward_hook_returning_another_dtype_fails_by_name() -> None:
    model, point = MODELS["dense"], name("resid_mid", 0)
    model.add_hook(point, lambda g, h: (g.double(),), dir="bwd")
    try:
        with pytest.raises(HookError, match=rf"backward hook on {point!r} returned dtype "
                           r"torch.float64, expected torch.float32"):  # fmt: skip
            model(TOKENS, return_type="loss").backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
