"""KL divergence from a fixed next-token distribution, for scoring many runs against one.

With ``p`` the reference distribution (logits ``c``), ``q`` another (logits
``z``), ``d = z - c`` and any shift ``t``::

    log p_v - log q_v = -d_v + (LSE(z) - LSE(c)),   LSE(z) - LSE(c) = log sum_v p_v e^{d_v}
    KL(p || q) = log sum_v p_v e^{d_v} - sum_v p_v d_v
               = t + log1p(sum_v p_v expm1(d_v - t)) - sum_v p_v d_v

No log-softmax of the full vocabulary is written (on a 50k-token vocabulary
that and the textbook ``sum p (log p - log q)`` were most of the KL's time).
Every sum's terms vanish as the runs get close, so float32 keeps the digits
that thresholds on small KLs need, and identical logits give exactly 0.
``t = max_v d_v`` keeps ``expm1`` from overflowing and is about 0 for close
runs. Where ``sum p e^{d - t}`` is small (far runs: the mass ``q`` takes is
where ``p`` has little), ``log1p`` of a sum near -1 would lose digits, so
those rows take ``log sum p e^{d - t}`` directly. (``LSE(z) - sum p z + sum
p log p`` instead cancels at the entropy's scale: 1e-5 error on a KL of 1e-3
over 50k tokens, measured; a plain ``log sum p e^d`` is off by float32's
rounding of ``sum p``, 3e-6 there.) The sums divide by ``sum p`` as float32
holds it, so ``p`` is a distribution.

Reference probabilities below float32's normal range are set to 0:
multiplying subnormal numbers is about 100x slower on CPUs, and such a term
changes a KL by less than 1e-36 unless the other run raises that token's
logit by more than 69 nats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mitk.shapes import Float


class NextTokenReference:
    """The reference distribution; ``kl(logits)`` is KL(reference || softmax(logits))."""

    def __init__(self, logits: Float[Tensor, "*shape d_vocab"]) -> None:
        self.logits = logits.detach().float()
        probs = self.logits.softmax(-1)
        self.probs = probs.masked_fill(probs < torch.finfo(probs.dtype).tiny, 0.0)
        self.total = self.probs.sum(-1, dtype=torch.float64).float().reshape(-1)

    def kl(self, logits: Float[Tensor, "*lead_and_shape d_vocab"]) -> Float[Tensor, "..."]:
        """KL per distribution: ``logits`` is the reference's shape, with any leading axes.

        Differentiable in ``logits``. Rounding below 0 is clamped (a KL is never negative).
        """
        shape, vocab = self.probs.shape, self.probs.shape[-1]
        if tuple(logits.shape[logits.dim() - len(shape) :]) != tuple(shape):
            raise ValueError(
                f"logits {tuple(logits.shape)} do not end in the reference's shape {tuple(shape)}"
            )
        p = self.probs.reshape(-1, vocab)
        d = (logits.float() - self.logits).reshape(-1, p.shape[0], vocab)
        expected = torch.einsum("vnk,nk->vn", d, p) / self.total
        top = d.amax(-1, keepdim=True)  # no overflow in expm1; about 0 for close runs
        tracked = torch.is_grad_enabled() and d.requires_grad
        moved = (d - top).expm1() if tracked else d.sub_(top).expm1_()  # d is ours: reuse it
        share = torch.einsum("vnk,nk->vn", moved, p) / self.total  # sum p e^{d-t} / sum p - 1
        far = share < -0.5
        log_mass = torch.log1p(share)
        if bool(far.any()):  # log1p near -1 loses digits; these rows take the log directly
            v, n = far.nonzero(as_tuple=True)
            again = logits.float().reshape(d.shape)[v, n] - self.logits.reshape(-1, vocab)[n]
            direct = ((again - top[v, n]).exp() * p[n]).sum(-1) / self.total[n]
            log_mass = log_mass.index_put((v, n), direct.log())
        kl = top[..., 0] + log_mass - expected
        return kl.clamp_min(0.0).view(logits.shape[:-1])
