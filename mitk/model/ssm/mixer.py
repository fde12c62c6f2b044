"""The Mamba mixer: input projection, causal convolution, selective scan, gate, output."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mitk.config import SSMConfig, TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.forward_context import ForwardContext
from mitk.model.linear import affine
from mitk.model.mlp import ACTIVATIONS
from mitk.model.ssm.scan import chunked_scan, sequential_scan
from mitk.model.ssm.state import SSMState
from mitk.shapes import Float

CHUNKED = "ssm: chunked scan"
SEQUENTIAL = "ssm: sequential (a hook reads hook_A or hook_ssm_state)"


class SelectiveMixer(nn.Module):
    """What Mamba-1 and Mamba-2 mixers share: the hook points of the selective scan,
    the time-step bias init, and the module's name."""

    def _add_hook_points(self) -> None:
        self.hook_in_proj = HookPoint()
        self.hook_conv = HookPoint()
        self.hook_dt = HookPoint()
        self.hook_B = HookPoint()
        self.hook_C = HookPoint()
        self.hook_A = HookPoint(derived=True)
        self.hook_ssm_state = HookPoint(derived=True)
        self.hook_gated = HookPoint()

    @staticmethod
    def init_dt_bias(b_dt: Tensor, gen: torch.Generator) -> None:
        """Time steps log-uniform in ``[0.001, 0.1]``: ``softplus(b_dt) == dt``."""
        low, high = math.log(1e-3), math.log(1e-1)
        dt = (torch.rand(b_dt.shape, generator=gen) * (high - low) + low).exp()
        b_dt.copy_(dt + torch.log(-torch.expm1(-dt)))

    @property
    def name(self) -> str:
        """Where this module sits in the model (``"blocks.3.mixer"``), from its hooks' names."""
        return self.hook_gated.name.rpartition(".")[0]


class MambaMixer(SelectiveMixer):
    """Mamba-1's selective state-space mixer (see ``SSMConfig`` for the computation).

    Hooks (``c = d_inner``, ``n = d_state``):

    - ``hook_in_proj [batch, pos, 2c]``: the input projection, ``x`` then the gate.
    - ``hook_conv [batch, pos, c]``: ``x`` after the causal convolution and activation.
    - ``hook_dt [batch, pos, c]``: the time step, after softplus.
    - ``hook_B``/``hook_C [batch, pos, n]``: the selective input and output maps.
    - ``hook_A [batch, pos, c, n]``: the discretised decay ``exp(dt A)`` of each step.
    - ``hook_ssm_state [batch, pos, c, n]``: the state ``h`` after each position.
    - ``hook_gated [batch, pos, c]``: ``(C·h + D x) * silu(gate)``, what ``W_out`` reads.

    ``hook_A`` and ``hook_ssm_state`` are built only when hooked (or cached by
    name): the mixer then runs the sequential scan, which keeps every state, and
    a replacement of either changes what the outputs read (a replaced state
    changes that position's readout and, at the last position, the state
    carried on; it does not re-run the recurrence). Otherwise the chunked scan
    runs and no per-position state is kept. Padding (``ctx.mask.key_valid``)
    zeroes the mixer's input and the convolution's output at padded positions,
    as Hugging Face does, so left padding leaves the state at zero.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        assert cfg.ssm is not None
        ssm: SSMConfig = cfg.ssm
        self.layer = layer
        self.ssm = ssm
        self.act = ACTIVATIONS[cfg.act_fn]
        c, n = ssm.d_inner, ssm.d_state
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, 2 * c))
        self.b_in = nn.Parameter(torch.zeros(2 * c)) if ssm.proj_bias else None
        self.W_conv = nn.Parameter(torch.empty(c, ssm.d_conv))
        self.b_conv = nn.Parameter(torch.zeros(c)) if ssm.conv_bias else None
        self.W_x = nn.Parameter(torch.empty(c, ssm.dt_rank + 2 * n))
        self.W_dt = nn.Parameter(torch.empty(ssm.dt_rank, c))
        self.b_dt = nn.Parameter(torch.zeros(c))
        self.A_log = nn.Parameter(torch.empty(c, n))
        self.D = nn.Parameter(torch.empty(c))
        self.W_out = nn.Parameter(torch.empty(c, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if ssm.proj_bias else None
        self._add_hook_points()

    @torch.no_grad()
    def init_ssm_parameters(self, gen: torch.Generator) -> None:
        """Mamba's init of what a generic init gets wrong: ``A = -[1..d_state]`` per channel,
        ``D = 1``, and time steps log-uniform in ``[0.001, 0.1]`` through ``b_dt``."""
        n = self.ssm.d_state
        self.A_log.copy_(torch.arange(1, n + 1, dtype=torch.float32).log().expand_as(self.A_log))
        self.D.fill_(1.0)
        self.init_dt_bias(self.b_dt, gen)

    @property
    def A(self) -> Float[Tensor, "d_inner d_state"]:
        """The continuous-time decay rates ``-exp(A_log)`` (negative)."""
        return -self.A_log.exp()

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """The mixer's write for the pass's new positions, after any state in ``ctx.past``."""
        c = self.ssm.d_inner
        past = ctx.past.get(self.layer)
        valid = padding_mask(ctx, x.shape[1], x.dtype)
        if valid is not None:
            x = x * valid
        xs, gate = self.hook_in_proj(affine(x, self.W_in, self.b_in)).split(c, dim=-1)
        conv_out, conv_state = causal_conv(xs, None if past is None else past[0], self.W_conv,
                                           self.b_conv)  # fmt: skip
        xs = self.act(conv_out)
        if valid is not None:
            xs = xs * valid
        xs = self.hook_conv(xs)
        dt_low, B, C = affine(xs, self.W_x, None).split(
            [self.ssm.dt_rank, self.ssm.d_state, self.ssm.d_state], dim=-1
        )
        dt = self.hook_dt(F.softplus(affine(dt_low, self.W_dt, self.b_dt)))
        B, C = self.hook_B(B), self.hook_C(C)
        h0 = None if past is None else past[1]
        if self.hook_A.has_hooks or self.hook_ssm_state.has_hooks:
            ctx.record_path(self.name, SEQUENTIAL)
            decay = self.hook_A((dt[..., None] * self.A).exp())
            u = (dt * xs)[..., None] * B[:, :, None, :]
            states = self.hook_ssm_state(sequential_scan(decay, u, h0))
            y = torch.einsum("btcn,btn->btc", states, C)
            last = states[:, -1]
        else:
            ctx.record_path(self.name, CHUNKED)
            y, last = chunked_scan(xs, dt, self.A, B, C, h0)
        gated = self.hook_gated((y + xs * self.D) * F.silu(gate))
        if ctx.present is not None:
            ctx.present[self.layer] = SSMState(conv_state, last)
        return affine(gated, self.W_out, self.b_out)


def causal_conv(
    xs: Float[Tensor, "batch pos channel"],
    past: Tensor | None,
    W_conv: Float[Tensor, "channel width"],
    b_conv: Tensor | None,
) -> tuple[Float[Tensor, "batch pos channel"], Float[Tensor, "batch channel past"]]:
    """The causal depthwise convolution after the ``past`` inputs (None: zeros), and the
    last ``width - 1`` inputs it leaves for the next pass."""
    width = W_conv.shape[1] - 1
    seq = xs.transpose(1, 2)  # [batch, channel, pos]
    if past is None:
        past = seq.new_zeros(*seq.shape[:2], width)
    full = torch.cat([past.to(seq.dtype), seq], dim=-1)
    out = F.conv1d(full, W_conv[:, None, :], b_conv, groups=W_conv.shape[0])
    # positions-major again, in memory too: the scan slices positions
    return out.transpose(1, 2).contiguous(), full[..., full.shape[-1] - width :]


def padding_mask(ctx: ForwardContext, pos: int, dtype: torch.dtype) -> Tensor | None:
    """``[batch, pos, 1]``: 1 at the pass's real tokens, 0 at padding (None: no padding)."""
    key_valid = ctx.mask.key_valid
    if key_valid is None:
        return None
    return key_valid[:, -pos:, None].to(dtype)
