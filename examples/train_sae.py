"""Train a TopK sparse autoencoder on the embedded model's residual stream and evaluate it.

Run: python examples/train_sae.py   (saves the SAE under a temporary directory)
"""

from __future__ import annotations

from pathlib import Path
import tempfile

import torch

from mitk import HookedTransformer
from mitk.sae import ActivationStore, SAEConfig, SparseAutoencoder, evaluate, train
from mitk.sequences import periodic_segments

HOOK = "blocks.0.hook_resid_post"


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    model = HookedTransformer.from_pretrained("toy-induction")
    d_vocab = model.cfg.d_vocab
    tokens = periodic_segments(256, 64, d_vocab, torch.Generator().manual_seed(0))
    store = ActivationStore(
        model, HOOK, tokens, batch_size=1024, model_batch_size=64, buffer_batches=8, normalize=True
    )
    cfg = SAEConfig(
        d_in=model.cfg.d_model,
        d_sae=512,
        architecture="topk",
        k=16,
        batch_size=1024,
        total_tokens=1024 * 150,
        lr=2e-3,
        hook_name=HOOK,
        log_every=50,
    )
    result = train(cfg, store, progress=False)
    for row in result.history:
        print(f"step {row['step']:>4}: FVU {row[HOOK + '/fvu']:.3f}, L0 {row[HOOK + '/l0']:.1f}")

    out = Path(tempfile.mkdtemp(prefix="mitk-sae-")) / "sae"
    result.sae.save(out)
    sae = SparseAutoencoder.load(out)
    held_out = periodic_segments(64, 64, d_vocab, torch.Generator().manual_seed(1))
    metrics = evaluate(sae, model=model, tokens=held_out)
    print(
        f"held out: FVU {metrics.fvu:.3f}, L0 {metrics.l0:.1f}, "
        f"CE loss recovered {metrics.ce_loss_recovered:.3f}"
    )
    print(f"SAE saved to {out}")


if __name__ == "__main__":
    main()
