"""The Mamba-2 mixer: per-head scalar decay, grouped ``B``/``C``, a grouped gated RMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import SSMConfig, TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.forward_context import ForwardContext
from mitk.model.linear import affine
from mitk.model.mlp import ACTIVATIONS
from mitk.model.ssm.mixer import (
    CHUNKED,
    SEQUENTIAL,
    SelectiveMixer,
    causal_conv,
    padding_mask,
)
from mitk.model.ssm.scan import sequential_scan
from mitk.model.ssm.ssd import ssd_scan
from mitk.model.ssm.state import SSMState
from mitk.shapes import Float


class GroupRMSNorm(nn.Module):
    """RMSNorm over each group of ``width / groups`` channels, one weight ``w [width]``.

    ``hook_scale [..., groups, 1]`` and ``hook_normalized [..., width]`` as in ``RMSNorm``.
    """

    def __init__(self, width: int, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.w = nn.Parameter(torch.ones(width))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "*lead width"]) -> Float[Tensor, "*lead width"]:
        grouped = x.unflatten(-1, (self.groups, -1))
        scale = self.hook_scale((grouped.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized((grouped / scale).flatten(-2)) * self.w


class Mamba2Mixer(SelectiveMixer):
    """Mamba-2's selective state-space mixer (see ``SSMConfig``); ``c = d_inner``, ``n = d_state``.

    Hooks: ``hook_in_proj [batch, pos, c + conv + heads]`` (gate, then ``x``/``B``/``C``
    before the convolution, then ``dt`` before its bias), ``hook_conv [batch, pos, c + 2
    groups n]`` (after the convolution and activation), ``hook_dt [batch, pos, heads]``
    (after bias and softplus), ``hook_B``/``hook_C [batch, pos, groups, n]``, ``hook_A
    [batch, pos, heads]`` (each head's decay ``exp(dt A)``) and ``hook_ssm_state [batch,
    pos, c, n]`` (channels head by head; both built only when hooked, on the sequential
    path, as in ``MambaMixer``), ``hook_gated [batch, pos, c]`` (``(C·h + D x) *
    silu(gate)``, before the norm) and the norm's ``norm.hook_scale``/``hook_normalized``.
    When neither ``hook_A`` nor ``hook_ssm_state`` is hooked, the scan runs in chunks as
    matrix products (``ssd_scan``) and keeps no per-position state.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        assert cfg.ssm is not None
        ssm: SSMConfig = cfg.ssm
        self.layer, self.ssm = layer, ssm
        self.act = ACTIVATIONS[cfg.act_fn]
        c, n, heads = ssm.d_inner, ssm.d_state, ssm.n_heads
        conv = c + 2 * ssm.n_groups * n
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, c + conv + heads))
        self.b_in = nn.Parameter(torch.zeros(c + conv + heads)) if ssm.proj_bias else None
        self.W_conv = nn.Parameter(torch.empty(conv, ssm.d_conv))
        self.b_conv = nn.Parameter(torch.zeros(conv)) if ssm.conv_bias else None
        self.b_dt = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GroupRMSNorm(c, ssm.n_groups, cfg.norm_eps)
        self.W_out = nn.Parameter(torch.empty(c, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if ssm.proj_bias else None
        self._add_hook_points()

    @torch.no_grad()
    def init_ssm_parameters(self, gen: torch.Generator) -> None:
        """Mamba-2's init: ``A = -[1..heads]``, ``D = 1``, time steps log-uniform in
        ``[0.001, 0.1]`` through ``b_dt``."""
        self.A_log.copy_(torch.arange(1, self.ssm.n_heads + 1, dtype=torch.float32).log())
        self.D.fill_(1.0)
        self.init_dt_bias(self.b_dt, gen)

    @property
    def A(self) -> Float[Tensor, " heads"]:
        """Each head's continuous-time decay rate ``-exp(A_log)`` (negative)."""
        return -self.A_log.exp()

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """The mixer's write for the pass's new positions, after any state in ``ctx.past``."""
        ssm = self.ssm
        c, n, heads, groups = ssm.d_inner, ssm.d_state, ssm.n_heads, ssm.n_groups
        pos = x.shape[1]
        past = ctx.past.get(self.layer)
        valid = padding_mask(ctx, pos, x.dtype)
        if valid is not None:
            x = x * valid
        proj = self.hook_in_proj(affine(x, self.W_in, self.b_in))
        gate, xBC, dt_raw = proj.split([c, c + 2 * groups * n, heads], dim=-1)
        conv_out, conv_state = causal_conv(
            xBC, None if past is None else past[0], self.W_conv, self.b_conv
        )
        xBC = self.act(conv_out)
        if valid is not None:
            xBC = xBC * valid
        xs, B, C = self.hook_conv(xBC).split([c, groups * n, groups * n], dim=-1)
        B = self.hook_B(B.unflatten(-1, (groups, n)))
        C = self.hook_C(C.unflatten(-1, (groups, n)))
        dt = self.hook_dt(F.softplus(dt_raw + self.b_dt))
        per_channel = c // heads
        h0 = None if past is None else past[1]
        if self.hook_A.has_hooks or self.hook_ssm_state.has_hooks:
            ctx.record_path(self.name, SEQUENTIAL)
            decay = self.hook_A((dt * self.A).exp()).repeat_interleave(per_channel, dim=-1)
            dt_c = dt.repeat_interleave(per_channel, dim=-1)  # [batch, pos, c]
            u = (dt_c * xs)[..., None] * _per_channel(B, c)
            states = self.hook_ssm_state(sequential_scan(decay[..., None].expand_as(u), u, h0))
            y = torch.einsum("btcn,btcn->btc", states, _per_channel(C, c))
            last = states[:, -1]
        else:
            ctx.record_path(self.name, CHUNKED)
            by_head = xs.unflatten(-1, (heads, per_channel))
            y, last = ssd_scan(
                by_head, dt, self.A, B, C, None if h0 is None else h0.unflatten(1, (heads, -1))
            )
            y, last = y.flatten(-2), last.flatten(1, 2)
        D = self.D.repeat_interleave(per_channel)
        gated = self.hook_gated((y + xs * D) * F.silu(gate))
        if ctx.present is not None:
            ctx.present[self.layer] = SSMState(conv_state, last)
        return affine(self.norm(gated), self.W_out, self.b_out)


def _per_channel(
    grouped: Float[Tensor, "batch pos groups d_state"], channels: int
) -> Float[Tensor, "batch pos channels d_state"]:
    """A group's ``B`` or ``C`` repeated for each of the group's channels."""
    return grouped.repeat_interleave(channels // grouped.shape[2], dim=2)
