"""Patching sites: short names, their hook names, and which axes hold positions and heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from mitk.errors import UnknownHookError
from mitk.hooks import name

Granularity = Literal["layer", "pos", "head", "head_pos", "expert", "expert_pos"]
GRANULARITIES: tuple[Granularity, ...] = ("layer", "pos", "head", "head_pos")
EXPERT_GRANULARITIES: tuple[Granularity, ...] = ("layer", "pos", "expert", "expert_pos")
ALL_GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
AS_HEADS: dict[str, Granularity] = {"expert": "head", "expert_pos": "head_pos"}
"""Expert granularities index their site's unit axis exactly as head ones index heads."""


def unit_granularity(per: str) -> Granularity:
    """``per`` with experts read as heads: the patching machinery indexes both alike."""
    return AS_HEADS[per] if per in AS_HEADS else cast(Granularity, per)


@dataclass(frozen=True)
class Site:
    """Where an activation lives and how to index into it.

    ``pos_axis``/``head_axis`` are axes of the hooked activation (batch is 0);
    a site without heads supports only ``layer`` and ``pos`` granularity.
    """

    short: str
    kind: str
    pos_axis: int
    head_axis: int | None = None
    kv_heads: bool = False  # k and v keep the key-value head count under GQA
    unit: Literal["head", "expert"] = "head"
    """What ``head_axis`` indexes: attention heads, or a mixture of experts' experts."""
    moe_only: bool = False  # exists on mixture-of-experts layers only
    ssm_only: bool = False  # exists on recurrent mixer (Mamba, RWKV) layers that have the hook

    def hook(self, layer: int) -> str:
        """The hook name of this site at ``layer``."""
        return name(self.kind, layer)

    def granularities(self) -> tuple[Granularity, ...]:
        """Which ``per=`` values this site supports."""
        if self.head_axis is None:
            return ("layer", "pos")
        return EXPERT_GRANULARITIES if self.unit == "expert" else GRANULARITIES

    def layers(self, model: Any) -> list[int]:
        """The layers that have this site's hook: MoE layers for router/expert sites; in a
        hybrid, attention sites on its attention layers and mixer sites on its mixers."""
        cfg = model.cfg
        layers = list(range(cfg.n_layers))
        if self.moe_only:
            layers = [layer for layer in layers if cfg.is_moe_layer(layer)]
        found = [layer for layer in layers if self.hook(layer) in model.hook_dict]
        if not found:
            kind = "recurrent " if self.ssm_only else ""
            raise ValueError(f"this model has no {kind}layer with site {self.short!r}")
        return found

    def units(self, model: Any) -> int:
        """Size of ``head_axis``: experts, key-value heads (``k``/``v``) or query heads."""
        cfg = model.cfg
        if self.unit == "expert":
            return int(cfg.moe.n_experts)
        return int(cfg.n_key_value_heads if self.kv_heads else cfg.n_heads)


SITES: dict[str, Site] = {
    s.short: s
    for s in (
        Site("resid_pre", "resid_pre", pos_axis=1),
        Site("resid_mid", "resid_mid", pos_axis=1),
        Site("resid_post", "resid_post", pos_axis=1),
        Site("attn_out", "attn_out", pos_axis=1),
        Site("mlp_out", "mlp_out", pos_axis=1),
        Site("z", "z", pos_axis=1, head_axis=2),
        Site("q", "q", pos_axis=1, head_axis=2),
        Site("k", "k", pos_axis=1, head_axis=2, kv_heads=True),
        Site("v", "v", pos_axis=1, head_axis=2, kv_heads=True),
        Site("pattern", "pattern", pos_axis=2, head_axis=1),  # pos = query position
        # Longformer: the global tokens' own projections (at every position)
        Site("q_global", "q_global", pos_axis=1, head_axis=2),
        Site("k_global", "k_global", pos_axis=1, head_axis=2),
        Site("v_global", "v_global", pos_axis=1, head_axis=2),
        Site("post", "post", pos_axis=1),  # MLP neuron activations
        # mixture-of-experts layers: router logits and each expert's write, per expert
        Site(
            "router_logits", "router_logits", pos_axis=1, head_axis=2, unit="expert", moe_only=True
        ),
        Site("expert_out", "expert_out", pos_axis=1, head_axis=2, unit="expert", moe_only=True),
        Site("shared_out", "shared_out", pos_axis=1, moe_only=True),
        # recurrent mixers: the mixer's write and its gated output (what W_out reads)
        Site("mixer_out", "mixer_out", pos_axis=1, ssm_only=True),
        Site("gated", "gated", pos_axis=1, ssm_only=True),
        Site("wkv", "wkv", pos_axis=1, ssm_only=True),  # RWKV: the average time mixing reads
    )
}


def site_for(short: str, per: str) -> Site:
    """The site named ``short``, checked to support granularity ``per``."""
    if short not in SITES:
        raise UnknownHookError(short, SITES, what="patching site")
    site = SITES[short]
    if per not in site.granularities():
        raise ValueError(
            f"site {short!r} supports per={list(site.granularities())}, not per={per!r}"
        )
    return site
