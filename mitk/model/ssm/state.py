"""What a state-space mixer carries from one forward to the next: its recurrent state."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from mitk.shapes import Float


class SSMState(NamedTuple):
    """One mixer layer's state after the positions seen so far.

    It takes the place of a layer's keys and values in ``ForwardContext.past``/
    ``present`` and in a ``KVCache``: constant size, whatever the sequence length.
    """

    conv: Float[Tensor, "batch d_inner d_conv_minus_1"]
    """The last ``d_conv - 1`` inputs of the causal convolution (zeros before the first)."""
    ssm: Float[Tensor, "batch d_inner d_state"]
    """The recurrent state ``h`` after the last position."""
