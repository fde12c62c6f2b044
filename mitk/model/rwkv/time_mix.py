"""RWKV-4 time mixing: token shift, receptance/key/value, the WKV average, the sigmoid gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mitk.config import RWKVConfig, TransformerConfig
from mitk.hooks import HookPoint
from mitk.model.linear import affine
from mitk.model.rwkv.shift import blend, mix_ramp, token_shift
from mitk.model.rwkv.wkv import (
    WKVStates,
    chunked_wkv,
    shifted_states,
    wkv_readout,
    wkv_states,
)
from mitk.shapes import Float

WKV_PATH = "rwkv: chunked wkv"
STATES_PATH = "rwkv: chunked wkv, every state kept (a hook reads hook_wkv_state)"


class TimeMixer(nn.Module):
    """RWKV-4's time mixing (see ``RWKVConfig``): the attention slot of an RWKV block.

    Hooks (``c = d_attn``; all ``[batch, pos, ...]``):

    - ``hook_shifted [.., d_model]``: the previous position's (normed) input, which each
      position blends with its own by ``mix_r``/``mix_k``/``mix_v``.
    - ``hook_r``/``hook_k``/``hook_v [.., c]``: receptance (before its sigmoid), key, value.
    - ``hook_wkv_state [.., c, 3]``: the state after each position, ``(num, den,
      log_scale)`` with ``a = num e^{log_scale}`` the decayed key-weighted sum of values
      and ``b = den e^{log_scale}`` of weights (see ``mitk.model.rwkv.wkv``); float32 at
      least. Built only when hooked (or cached by name); a replacement changes what
      the next position reads and, at the last position, the state carried on (it does
      not re-run the recurrence).
    - ``hook_wkv [.., c]``: the weighted average of values each position reads.
    - ``hook_gated [.., c]``: ``sigmoid(r) * wkv``, what ``W_out`` reads.

    Padded positions (``valid`` 0) have zero input and add nothing to the state.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        assert cfg.rwkv is not None
        rwkv: RWKVConfig = cfg.rwkv
        d, c = cfg.d_model, rwkv.d_attn
        self.layer = layer
        self.mix_r = nn.Parameter(torch.empty(d))
        self.mix_k = nn.Parameter(torch.empty(d))
        self.mix_v = nn.Parameter(torch.empty(d))
        self.W_r = nn.Parameter(torch.empty(d, c))
        self.W_k = nn.Parameter(torch.empty(d, c))
        self.W_v = nn.Parameter(torch.empty(d, c))
        self.time_decay = nn.Parameter(torch.empty(c))
        self.time_first = nn.Parameter(torch.empty(c))
        self.W_out = nn.Parameter(torch.empty(c, d))
        self.hook_shifted = HookPoint()
        self.hook_r = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_wkv_state = HookPoint(derived=True)
        self.hook_wkv = HookPoint()
        self.hook_gated = HookPoint()

    @property
    def name(self) -> str:
        """Where this module sits in the model (``"blocks.3.mixer"``), from its hooks' names."""
        return self.hook_gated.name.rpartition(".")[0]

    @property
    def w(self) -> Float[Tensor, " d_attn"]:
        """The per-step decay rate ``exp(time_decay)`` (the state shrinks by ``e^{-w}``)."""
        return self.time_decay.exp()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        valid: Float[Tensor, "batch pos 1"] | None,
        last_input: Float[Tensor, "batch d_model"] | None,
        state: WKVStates | None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], WKVStates]:
        """The mixer's write, and the WKV state after the last position.

        ``x`` is the normed stream (zero at padding), ``last_input`` the input before the
        first position and ``state`` the WKV state there (None: none, empty).
        """
        shifted = self.hook_shifted(token_shift(x, last_input))
        r = self.hook_r(affine(blend(x, shifted, self.mix_r), self.W_r, None))
        k = self.hook_k(affine(blend(x, shifted, self.mix_k), self.W_k, None))
        v = self.hook_v(affine(blend(x, shifted, self.mix_v), self.W_v, None))
        dtype = torch.promote_types(k.dtype, torch.float32)  # exponents of keys: never fp16
        kf, vf = k.to(dtype), v.to(dtype)
        if valid is not None:  # a padded key weighs e^EMPTY = 0
            kf = torch.where(valid.bool(), kf, torch.full_like(kf, -1e38))
        w, u = self.w.to(dtype), self.time_first.to(dtype)
        if self.hook_wkv_state.has_hooks:  # every state, read out after the hook had its say
            stacked = self.hook_wkv_state(torch.stack(wkv_states(kf, vf, w, state), -1))
            after = WKVStates(*stacked.unbind(-1))
            averaged = wkv_readout(shifted_states(after, state), kf, vf, u)
            last = WKVStates(*(part[:, -1] for part in after))
        else:
            averaged, last = chunked_wkv(kf, vf, w, u, state)
        gated = self.hook_gated(torch.sigmoid(r) * self.hook_wkv(averaged.to(x.dtype)))
        return affine(gated, self.W_out, None), last

    @torch.no_grad()
    def init_rwkv_parameters(self, n_layers: int) -> None:
        """RWKV-4's init of what a generic init gets wrong: decay rates spread from slow to
        fast across channels, the current token's bonus near ``log(0.3)``, and mixes that
        lean on the current token more in deeper layers."""
        c = self.time_decay.shape[0]
        depth = self.layer / max(n_layers - 1, 1)
        channel = torch.arange(c, dtype=torch.float32) / max(c - 1, 1)
        self.time_decay.copy_(-5 + 8 * channel ** (0.7 + 1.3 * depth))
        zigzag = ((torch.arange(c) + 1) % 3 - 1).float() * 0.5
        self.time_first.copy_(torch.full((c,), 0.3).log() + zigzag)
        ramp = mix_ramp(self.mix_k.shape[0], 1.0 - self.layer / n_layers)
        self.mix_k.copy_(ramp)
        self.mix_v.copy_(ramp + 0.3 * depth)
        self.mix_r.copy_(ramp.sqrt())
