"""Hook names: typed builders for the canonical (TransformerLens-compatible) strings.

``name("resid_pre", 3)`` gives ``"blocks.3.hook_resid_pre"``. Whether a name
exists on a particular model is decided by that model's HookPoints (see
``registry.py``); this module only spells names.
"""

from __future__ import annotations

from typing import Literal, get_args

from mitk.errors import UnknownHookError

HookKind = Literal[
    "embed",
    "pos_embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "q",
    "k",
    "v",
    "q_normed",
    "k_normed",
    "rot_q",
    "rot_k",
    "q_global",
    "k_global",
    "v_global",
    "attn_scores",
    "pattern",
    "sink_prob",
    "z",
    "result",
    "kv_latent",
    "pre",
    "pre_linear",
    "post",
    "router_logits",
    "expert_indices",
    "expert_weights",
    "expert_out",
    "shared_out",
    "scale",
    "normalized",
    "mixer_out",
    "in_proj",
    "conv",
    "dt",
    "A",
    "B",
    "C",
    "ssm_state",
    "gated",
    "wkv",
    "wkv_state",
]

_MODEL_LEVEL = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}
_BLOCK_LEVEL = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mixer_out"}
# kv_latent exists on latent-attention (MLA) layers only, q/k_normed with cfg.qk_norm only,
# the *_global projections on Longformer layers only
_ATTN_LEVEL = {
    "q", "k", "v", "q_normed", "k_normed", "rot_q", "rot_k", "attn_scores", "pattern", "z",
    "result", "kv_latent", "sink_prob", "q_global", "k_global", "v_global",
}  # fmt: skip
# the router/expert kinds exist on mixture-of-experts layers only (shared_out with a shared expert)
_MLP_LEVEL = {
    "pre", "pre_linear", "post", "router_logits", "expert_indices", "expert_weights",
    "expert_out", "shared_out",
}  # fmt: skip
# a recurrent (Mamba, RWKV time-mixing) layer's mixer: mixer_out is its write, these its insides
_MIXER_LEVEL = {"in_proj", "conv", "dt", "A", "B", "C", "ssm_state", "gated", "wkv", "wkv_state"}
_NORM_LEVEL = {"scale", "normalized"}
NORMS = ("ln1", "ln2")


def name(kind: str, layer: int | None = None, norm: str | None = None) -> str:
    """The canonical hook name for ``kind`` (one of ``HookKind``) at ``layer``.

    ``kind`` is typed ``str`` because it often comes from users (CLI flags,
    specs); an unknown kind is a runtime error with suggestions.

    ``norm`` picks ``"ln1"``/``"ln2"`` for ``scale``/``normalized``; with no
    layer those two refer to the final norm (``ln_final``). Raises
    ``UnknownHookError`` for an unknown kind and ``ValueError`` when a layer is
    missing or superfluous.
    """
    if kind not in get_args(HookKind):
        raise UnknownHookError(kind, get_args(HookKind), what="hook kind")
    if kind in _MODEL_LEVEL:
        if layer is not None:
            raise ValueError(f"hook kind {kind!r} is not per layer; drop layer={layer}")
        return _MODEL_LEVEL[kind]
    if kind in _NORM_LEVEL and layer is None:
        return f"ln_final.hook_{kind}"
    if layer is None:
        raise ValueError(f"hook kind {kind!r} needs a layer")
    if kind in _BLOCK_LEVEL:
        return f"blocks.{layer}.hook_{kind}"
    if kind in _ATTN_LEVEL:
        return f"blocks.{layer}.attn.hook_{kind}"
    if kind in _MLP_LEVEL:
        return f"blocks.{layer}.mlp.hook_{kind}"
    if kind in _MIXER_LEVEL:
        return f"blocks.{layer}.mixer.hook_{kind}"
    if norm not in NORMS:
        raise ValueError(f"hook kind {kind!r} at a layer needs norm='ln1' or 'ln2', got {norm!r}")
    return f"blocks.{layer}.{norm}.hook_{kind}"


def layer_of(hook_name: str) -> int | None:
    """The block index a hook name lives in, or None for model-level hooks."""
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None
