"""Hook names, registration, replacement, cleanup and backward hooks."""

from __future__ import annotations

import pytest
import torch

from mitk import HookedTransformer, hooks
from mitk.errors import HookError, ShapeMismatchError, UnknownHookError


def test_typed_builders_spell_canonical_names() -> None:
    assert hooks.name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    assert hooks.name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert hooks.name("post", 2) == "blocks.2.mlp.hook_post"
    assert hooks.name("scale", 1, "ln2") == "blocks.1.ln2.hook_scale"
    assert hooks.name("normalized") == "ln_final.hook_normalized"
    assert hooks.name("embed") == "hook_embed"
    with pytest.raises(UnknownHookError, match="did you mean 'resid_pre'"):
        hooks.name("resid_pr", 0)
    with pytest.raises(ValueError, match="needs a layer"):
        hooks.name("z")


def test_every_built_name_exists_on_the_model(tiny: HookedTransformer) -> None:
    kinds = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v",
             "attn_scores", "pattern", "z", "pre", "post"]  # fmt: skip
    for layer in range(tiny.cfg.n_layers):
        for kind in kinds:
            assert hooks.name(kind, layer) in tiny.hook_dict


@pytest.mark.parametrize(
    "call",
    [
        lambda m, t: m.run_with_cache(t, names_filter=["blocks.0.hook_resid_prx"]),
        lambda m, t: m.run_with_cache(t, names_filter="blocks.0.attn.hook_patern"),
        lambda m, t: m.run_with_hooks(t, fwd_hooks=[("blocks.0.hook_resid_prx", lambda a, h: a)]),
        lambda m, t: m.run_with_hooks(t, bwd_hooks=[("blocks.0.hook_resid_prx", lambda a, h: a)]),
    ],
)
def test_unknown_hook_names_are_rejected_with_suggestions(tiny: HookedTransformer, call) -> None:
    tokens = torch.randint(0, 50, (1, 5))
    with pytest.raises(UnknownHookError, match="did you mean") as info:
        call(tiny, tokens)
    assert isinstance(info.value, KeyError)
    assert not any(p.has_hooks for p in tiny.hook_dict.values())


def test_cache_lookup_unknown_and_uncached_names(tiny: HookedTransformer) -> None:
    _, cache = tiny.run_with_cache(
        torch.randint(0, 50, (1, 5)), names_filter="blocks.0.hook_resid_pre"
    )
    with pytest.raises(UnknownHookError, match=r"did you mean 'blocks\.0\.hook_resid_pre'"):
        cache["blocks.0.hook_resid_pr"]
    with pytest.raises(KeyError, match="exists but was not cached"):
        cache["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(cache["resid_pre", 0], cache["blocks.0.hook_resid_pre"])


def test_predicate_matching_nothing_is_an_error(tiny: HookedTransformer) -> None:
    with pytest.raises(HookError, match="matched no hook"):
        tiny.run_with_cache(torch.randint(0, 50, (1, 5)), names_filter=lambda n: "rot_q" in n)


def test_replacement_changes_downstream_and_is_removed_after(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 6))
    clean = tiny(tokens)

    def zero_head_1(z: torch.Tensor, hook: hooks.HookPoint) -> torch.Tensor:
        z = z.clone()
        z[:, :, 1] = 0
        return z

    patched = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_1)])
    assert not torch.allclose(patched, clean)
    torch.testing.assert_close(tiny(tokens), clean)


def test_predicate_hooks_fire_on_every_match(tiny: HookedTransformer) -> None:
    seen: list[str] = []
    tiny.run_with_hooks(
        torch.randint(0, 50, (1, 4)),
        fwd_hooks=[(lambda n: n.endswith("hook_resid_pre"), lambda a, h: seen.append(h.name))],
    )
    assert seen == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_hooks_removed_when_forward_raises(tiny: HookedTransformer) -> None:
    def boom(act: torch.Tensor, hook: hooks.HookPoint) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny.run_with_hooks(
            torch.randint(0, 50, (1, 4)), fwd_hooks=[("blocks.1.hook_mlp_out", boom)]
        )
    assert not any(p.has_hooks for p in tiny.hook_dict.values())
    with pytest.raises(RuntimeError, match="boom"), tiny.hooks(fwd_hooks=[("hook_embed", boom)]):
        tiny(torch.randint(0, 50, (1, 4)))
    assert not any(p.has_hooks for p in tiny.hook_dict.values())


def test_nested_contexts_remove_only_their_own(tiny: HookedTransformer) -> None:
    outer, inner = (lambda a, h: None), (lambda a, h: None)
    point = tiny.hook_dict["blocks.0.hook_resid_pre"]
    with tiny.hooks(fwd_hooks=[(point.name, outer)]):
        with tiny.hooks(fwd_hooks=[(point.name, inner)]):
            assert point.fwd_fns == [outer, inner]
        assert point.fwd_fns == [outer]
    assert point.fwd_fns == []


def test_wrong_shape_replacement_names_the_hook(tiny: HookedTransformer) -> None:
    with pytest.raises(ShapeMismatchError, match=r"blocks.0.attn.hook_z.*returned shape"):
        tiny.run_with_hooks(
            torch.randint(0, 50, (1, 4)),
            fwd_hooks=[("blocks.0.attn.hook_z", lambda a, h: a[:, :2])],
        )
    with pytest.raises(HookError, match="returned str"):
        tiny.run_with_hooks(
            torch.randint(0, 50, (1, 4)), fwd_hooks=[("hook_embed", lambda a, h: "x")]
        )


def test_backward_hooks_see_the_gradient_of_the_activation(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (2, 6))
    grads: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def keep_act(a: torch.Tensor, h: hooks.HookPoint) -> None:
        a.retain_grad()
        acts[h.name] = a

    name = "blocks.1.hook_resid_mid"
    loss = tiny.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[(name, keep_act)],
        bwd_hooks=[(name, lambda g, h: grads.__setitem__(h.name, g.clone()))],
    )
    loss.backward()  # after the context: the hook lives on the graph, so it still fires
    torch.testing.assert_close(grads[name], acts[name].grad)
    tiny.zero_grad()


def test_backward_hook_replacing_the_gradient(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 6))
    loss = tiny.run_with_hooks(
        tokens, return_type="loss", bwd_hooks=[("hook_embed", lambda g, h: torch.zeros_like(g))]
    )
    loss.backward()
    # the embedding matrix only receives gradient through hook_embed, which we zeroed
    assert tiny.W_E.grad is not None and tiny.W_E.grad.abs().sum() == 0
    tiny.zero_grad()


def test_backward_hook_under_no_grad_fails_loudly(tiny: HookedTransformer) -> None:
    with torch.no_grad(), pytest.raises(HookError, match="does not require grad"):
        tiny.run_with_hooks(
            torch.randint(0, 50, (1, 4)), bwd_hooks=[("hook_embed", lambda g, h: None)]
        )


def test_hooks_outside_the_layers_run_are_refused(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 4))
    with pytest.raises(HookError, match="would never fire"):
        tiny.run_with_hooks(tokens, stop_at_layer=1, fwd_hooks=[("blocks.1.hook_resid_pre", print)])
    with pytest.raises(HookError, match="would never fire"):
        tiny.run_with_cache(tokens, stop_at_layer=1, names_filter=["ln_final.hook_scale"])
    _, cache = tiny.run_with_cache(tokens, stop_at_layer=1)
    assert "blocks.0.hook_resid_post" in cache and "blocks.1.hook_resid_pre" not in cache


def test_run_with_cache_incl_bwd_stores_gradients(tiny: HookedTransformer) -> None:
    tokens = torch.randint(0, 50, (1, 6))
    _, cache = tiny.run_with_cache(
        tokens, return_type="loss", names_filter=lambda n: "resid" in n, incl_bwd=True
    )
    grad = cache.grad("blocks.1.hook_resid_post")
    assert grad.shape == cache["blocks.1.hook_resid_post"].shape and grad.abs().sum() > 0
    tiny.zero_grad()
