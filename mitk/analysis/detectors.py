"""Head detectors: previous-token, duplicate-token and induction scores from attention patterns.

Each score is the mean attention a head pays, over the probe's query positions,
to the key position the behaviour predicts. The probe is BOS followed by a
random segment and the same segment again (``repeated_random_tokens``), where
all three behaviours have unambiguous targets:

- previous-token: query ``i`` → key ``i - 1`` (every position after BOS);
- duplicate-token: a token in the repeat → its earlier occurrence, ``i - half``;
- induction: a token in the repeat → the token after its earlier occurrence,
  ``i - half + 1``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mitk.hooks import name
from mitk.sequences import repeated_random_tokens
from mitk.shapes import Float

BEHAVIOURS = ("previous_token", "duplicate_token", "induction")


def _mean_attention_at_offset(
    pattern: Float[Tensor, "batch head pos key_pos"], queries: range, offset: int
) -> Float[Tensor, " head"]:
    """Mean over batch and ``queries`` of the attention query ``i`` pays to key ``i - offset``."""
    q = torch.tensor(list(queries))
    return pattern[:, :, q, q - offset].mean(dim=(0, 2))


def head_detector_scores(
    model: Any,
    half: int = 20,
    batch: int = 32,
    seed: int = 0,
    bos: int = 0,
) -> pd.DataFrame:
    """One row per (layer, head): ``previous_token``, ``duplicate_token`` and ``induction`` scores.

    Scores lie in [0, 1]: 1 means the head always attends exactly where the
    behaviour predicts. Random tokens are drawn from ``[1, d_vocab)`` with a
    seeded generator, so the table is reproducible. ``1 + 2 * half`` must fit
    in the model's context.
    """
    if 1 + 2 * half > model.cfg.n_ctx and model.cfg.positional == "learned":
        raise ValueError(f"probe length {1 + 2 * half} exceeds n_ctx={model.cfg.n_ctx}")
    gen = torch.Generator().manual_seed(seed)
    tokens = repeated_random_tokens(batch, half, model.cfg.d_vocab, gen, bos=bos)
    patterns = [name("pattern", layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.W_E.device), names_filter=patterns)
    repeat = range(half + 1, 2 * half + 1)  # positions of the second copy
    rows = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[patterns[layer]].float().cpu()
        scores = {
            "previous_token": _mean_attention_at_offset(pattern, range(1, 2 * half + 1), 1),
            "duplicate_token": _mean_attention_at_offset(pattern, repeat, half),
            "induction": _mean_attention_at_offset(pattern, repeat, half - 1),
        }
        for head in range(pattern.shape[1]):
            row = {"layer": layer, "head": head, "label": f"L{layer}H{head}"}
            rows.append(row | {k: float(v[head]) for k, v in scores.items()})
    return pd.DataFrame(rows)
