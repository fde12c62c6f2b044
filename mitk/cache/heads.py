"""Key-value heads to query heads: the on-demand expansion grouped-query attention implies.

``hook_k``/``hook_v`` (and ``hook_rot_k``) keep the key-value head count, so a
cache stores what the model computed; analysis that pairs keys or values with
query heads expands them here, the way attention does: query head ``h`` reads
key-value head ``h // (n_heads // n_key_value_heads)``.
"""

from __future__ import annotations

from torch import Tensor

from mitk.shapes import Float


def expand_kv_heads(
    activation: Float[Tensor, "*lead kv_head d_head"], n_heads: int
) -> Float[Tensor, "*lead head d_head"]:
    """Repeat each key-value head for every query head of its group (``repeat_interleave``).

    Heads are the second-to-last axis, as in hooked ``[batch, pos, head, d]``
    activations. Returns ``activation`` itself when the counts already match;
    ``n_heads`` must be a multiple of the key-value head count.
    """
    n_kv = activation.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) is not a multiple of the {n_kv} key-value heads")
    group = n_heads // n_kv
    return activation if group == 1 else activation.repeat_interleave(group, dim=-2)
