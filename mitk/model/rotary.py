"""Rotary position embeddings (Su et al., RoFormer): rotate query/key pairs by position.

Each rotated pair of dimensions turns by ``position * base^(-2i / rotary_dim)``,
so ``q(m)·k(n)`` depends on positions only through ``m - n``. Two layouts of
the pairs exist in the wild: ``neox`` pairs dimension ``i`` with
``i + rotary_dim/2`` (LLaMA, GPT-NeoX, Mistral, Qwen2) and ``gptj`` pairs
``2i`` with ``2i+1`` (GPT-J). With ``rotary_dim < d_head`` (partial rotary)
the trailing dimensions pass through unrotated.

Context-extension scalings (``RotaryScaling``: linear, dynamic NTK, YaRN,
Llama 3, LongRoPE) change the frequency ladder; YaRN and LongRoPE also multiply
cos and sin by an attention factor, which ``apply_rotary`` takes as ``scale``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mitk.config import RotaryScaling, RotaryStyle
from mitk.errors import ConfigError
from mitk.shapes import Float, Int


def rotary_angles(
    positions: Int[Tensor, "#batch pos"],
    rotary_dim: int,
    base: float,
    scaling: RotaryScaling | None = None,
) -> Float[Tensor, "#batch pos half"]:
    """Angle of each rotated pair at each position, in fp32 (``half = rotary_dim // 2``).

    With ``dynamic`` and ``longrope`` scaling the ladder depends on the longest
    position in ``positions`` (its max + 1 is the sequence length), so pass
    exactly the positions of one forward's queries, as Hugging Face sees them.
    """
    seq_len, device = 0, positions.device
    if scaling is not None and scaling.kind == "longrope" and positions.numel():
        # both ladders, chosen on the device: the positions are not read back
        short = inverse_frequencies(rotary_dim, base, scaling, 0, device)
        long = inverse_frequencies(rotary_dim, base, scaling, scaling.original_context + 1, device)
        inv_freq = torch.where(positions.max() >= scaling.original_context, long, short)
        return positions.float()[..., None] * inv_freq
    if scaling is not None and scaling.kind == "dynamic" and positions.numel():
        seq_len = int(positions.max()) + 1  # a host sync: paid by dynamic scaling only
    inv_freq = inverse_frequencies(rotary_dim, base, scaling, seq_len, device)
    return positions.float()[..., None] * inv_freq


def inverse_frequencies(
    rotary_dim: int,
    base: float,
    scaling: RotaryScaling | None = None,
    seq_len: int = 0,
    device: torch.device | None = None,
) -> Float[Tensor, " half"]:
    """Radians per position of each rotated pair, after any context-extension ``scaling``.

    ``seq_len`` matters only to ``dynamic`` scaling and to ``longrope`` (its long
    factors past ``original_context``, else its short ones). Raises ``ConfigError``
    for dynamic scaling of a 2-dimensional rotary part (its exponent divides by 0)
    and for longrope factors that do not number ``rotary_dim / 2``.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float()
    kind = None if scaling is None else scaling.kind
    if scaling is not None and kind == "dynamic":
        if rotary_dim <= 2:
            raise ConfigError("dynamic rotary scaling needs rotary_dim > 2")
        length = max(seq_len, scaling.original_context)
        stretch = scaling.factor * length / scaling.original_context - (scaling.factor - 1)
        base = base * stretch ** (rotary_dim / (rotary_dim - 2))
    if scaling is not None and kind == "longrope":
        return _longrope(exponents / rotary_dim, base, scaling, seq_len)
    inv_freq = 1.0 / (base ** (exponents / rotary_dim))
    if scaling is None or kind == "dynamic":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling.factor
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return _yarn(inv_freq, scaling, rotary_dim, base)


def _longrope(exponents: Tensor, base: float, scaling: RotaryScaling, seq_len: int) -> Tensor:
    """Each pair's ``1 / (factor_i * base^exponent_i)``: long factors past the original context."""
    long = seq_len > scaling.original_context
    factors = scaling.long_factor if long else scaling.short_factor
    if factors is None or len(factors) != exponents.numel():
        raise ConfigError(
            f"longrope needs {exponents.numel()} per-pair factors, got "
            f"{None if factors is None else len(factors)}"
        )
    per_pair = torch.tensor(factors, dtype=torch.float32, device=exponents.device)
    return 1.0 / (per_pair * base**exponents)


def cache_outlives_short_factors(scaling: RotaryScaling | None, cached: int, total: int) -> bool:
    """Whether a cached generation step should rerun the whole sequence instead.

    True for ``longrope`` with ``recompute_at_switch`` when the ``cached``
    positions are within ``original_context`` and ``total`` (cached and new)
    passes it: the cached keys were rotated with the short factors, and the
    sequence now takes the long ones (Hugging Face's Phi-3 ``generate`` reruns too).
    """
    if scaling is None or scaling.kind != "longrope" or not scaling.recompute_at_switch:
        return False
    return 0 < cached <= scaling.original_context < total


def _llama3(inv_freq: Tensor, scaling: RotaryScaling) -> Tensor:
    """Long wavelengths divided by ``factor``, short ones kept, a linear blend between."""
    context, low, high = scaling.original_context, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / scaling.factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / scaling.factor + blend * scaled
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, scaled)


def _yarn(inv_freq: Tensor, scaling: RotaryScaling, rotary_dim: int, base: float) -> Tensor:
    """Interpolated (divided by ``factor``) and original frequencies blended by a dimension ramp."""

    def dimension_of(rotations: float) -> float:
        # the pair index that turns ``rotations`` times over the original context
        turns = scaling.original_context / (rotations * 2 * math.pi)
        return rotary_dim * math.log(turns) / (2 * math.log(base))

    low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    high = high + 0.001 if low == high else high  # a zero-width ramp would divide by zero
    index = torch.arange(rotary_dim // 2, dtype=torch.float32, device=inv_freq.device)
    interpolated = ((index - low) / (high - low)).clamp(0, 1)
    return inv_freq / scaling.factor * interpolated + inv_freq * (1 - interpolated)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    angles: Float[Tensor, "#batch pos half"],
    style: RotaryStyle,
    scale: float = 1.0,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``2 * half`` dimensions of every head of ``x`` by ``angles``.

    ``scale`` multiplies cos and sin (YaRN's attention factor), so the rotated
    dimensions are also scaled by it; the unrotated ones are not.
    """
    rotary_dim = 2 * angles.shape[-1]
    # cos/sin in fp32, then cast, as the reference implementations do
    cos = (angles.cos() * scale)[:, :, None].to(x.dtype)
    sin = (angles.sin() * scale)[:, :, None].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if style == "neox":
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
