"""NystromConfig: Nyströmformer attention's landmarks and skip (``TransformerConfig.nystrom``)."""

from __future__ import annotations

from dataclasses import dataclass

from mitk.config.json_config import JsonConfig, check_positive_ints
from mitk.errors import ConfigError


@dataclass(frozen=True)
class NystromConfig(JsonConfig):
    """Nyström-approximated softmax attention (Xiong et al. 2021), bidirectional.

    The ``n`` queries and keys are averaged over ``num_landmarks`` consecutive segments
    (``n / num_landmarks`` positions each) into landmarks ``q~`` and ``k~``; attention is
    ``softmax(q k~ᵀ) pinv(softmax(q~ k~ᵀ)) softmax(q~ kᵀ) v`` (each softmax of scaled
    dot products, padded keys masked in the last), the pseudo-inverse by
    ``pinv_iterations`` steps of an iterative Moore-Penrose method, plus a depthwise
    convolution of the values along positions (``conv_kernel_size`` taps per head).
    With ``num_landmarks == segment_means_seq_len`` attention is exact softmax attention
    (plus the convolution), as Hugging Face's ``NystromformerModel`` does.
    """

    num_landmarks: int
    """Landmarks per head: segments the sequence is averaged over."""
    segment_means_seq_len: int
    """Hugging Face's ``segment_means_seq_len``: the sequence length its landmark path is
    written for; equal to ``num_landmarks``, attention is exact softmax attention."""
    conv_kernel_size: int = 0
    """Taps of the depthwise convolution added to each head's output (odd); 0: none."""
    pinv_iterations: int = 6
    """Steps of the iterative pseudo-inverse (Hugging Face's fixed 6)."""

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_landmarks", "segment_means_seq_len", "pinv_iterations"))
        size = self.conv_kernel_size
        even = isinstance(size, int) and size > 0 and size % 2 == 0
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or even:
            raise ConfigError(
                f"nystrom conv_kernel_size must be 0 (none) or an odd positive int, got {size!r}"
            )

    @property
    def exact(self) -> bool:
        """Whether attention is exact softmax attention (Hugging Face's shortcut)."""
        return self.num_landmarks == self.segment_means_seq_len
