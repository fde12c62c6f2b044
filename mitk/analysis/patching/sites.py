"""Patching sites: short names, their hook names, and which axes hold positions and heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mitk.errors import UnknownHookError
from mitk.hooks import name

Granularity = Literal["layer", "pos", "head", "head_pos"]
GRANULARITIES: tuple[Granularity, ...] = ("layer", "pos", "head", "head_pos")


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

    def hook(self, layer: int) -> str:
        """The hook name of this site at ``layer``."""
        return name(self.kind, layer)

    def granularities(self) -> tuple[Granularity, ...]:
        """Which ``per=`` values this site supports."""
        return GRANULARITIES if self.head_axis is not None else ("layer", "pos")


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
        Site("post", "post", pos_axis=1),  # MLP neuron activations
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
