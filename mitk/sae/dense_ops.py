"""ReLU, decode and decoder-norm L1 penalty in one autograd node, for dense batches.

Autograd on ``relu(pre) @ W_dec`` plus ``relu(pre).sum(0) @ norms`` keeps the
penalty's gradient as a broadcast ``[batch, d_sae]`` tensor, materialises it,
adds it to the decoder's and only then applies the ReLU mask: three extra
passes over the largest tensor of the step. Here the penalty's gradient rides
in the latent-gradient matmul as its bias, and the mask is one pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mitk.shapes import Bool, Float, Int


class _ReluDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, W_dec: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
        latents = pre.relu()
        column_sums = latents.sum(0)
        ctx.save_for_backward(latents, W_dec, norms, column_sums)
        return latents @ W_dec, column_sums @ norms

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, grad_penalty: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        latents, W_dec, norms, column_sums = ctx.saved_tensors
        need_pre, need_w, need_norms = ctx.needs_input_grad
        grad_pre = grad_w = grad_norms = None
        if need_pre:
            grad_latents = torch.addmm(grad_penalty * norms, grad_out, W_dec.t())
            grad_pre = torch.ops.aten.threshold_backward(grad_latents, latents, 0)
        if need_w:
            grad_w = latents.t() @ grad_out
        if need_norms:
            grad_norms = grad_penalty * column_sums
        return grad_pre, grad_w, grad_norms


def relu_decode(
    pre: Float[Tensor, "batch d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    norms: Float[Tensor, " d_sae"],
) -> tuple[Float[Tensor, "batch d_in"], Float[Tensor, ""]]:
    """``(relu(pre) @ W_dec, sum of relu(pre) * norms)``: reconstruction (no bias) and L1 sum.

    The penalty is summed over rows and latents (divide by the row count for
    the usual mean); ``norms`` are the decoder-row norms it weights by.
    """
    out, penalty = _ReluDecode.apply(pre, W_dec, norms)
    return out, penalty


def column_counts(mask: Bool[Tensor, "batch d_sae"]) -> Int[Tensor, " d_sae"]:
    """``mask.sum(0)``, about 20x faster on CPU for large masks.

    A dim-0 sum of a bool matrix converts every element to int64 first. Here
    the mask's bytes are read as int64 words and summed 255 rows at a time, so
    each byte lane holds one column's count (at most 255: no carry crosses
    lanes); only the small block totals are then widened.
    """
    n_rows, width = mask.shape
    full = n_rows - n_rows % 255
    if width % 8 or not mask.is_contiguous() or full == 0:
        return mask.sum(0)
    blocks = mask[:full].view(torch.uint8).view(-1, 255, width).view(torch.int64)
    counts = blocks.sum(1).view(torch.uint8).sum(0, dtype=torch.int64)
    return counts + mask[full:].sum(0)
