"""Activation patching on clean/corrupted repeated sequences: where does the answer live?

Run: python examples/activation_patching.py
"""

from __future__ import annotations

import torch

from mitk import HookedTransformer
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.sequences import repeated_random_tokens


def main() -> None:
    model = HookedTransformer.from_pretrained("toy-induction")
    half, batch = 20, 16
    clean = repeated_random_tokens(batch, half, model.cfg.d_vocab, torch.Generator().manual_seed(0))
    other = repeated_random_tokens(batch, half, model.cfg.d_vocab, torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[:, 1 : half + 1] = other[:, 1 : half + 1]  # a different first copy
    # at the second-to-last position: the clean answer vs the token in its corrupted slot
    metric = logit_diff(clean[:, -1], corrupted[:, half], pos=-2)

    resid = activation_patch(model, clean, corrupted, metric, "resid_pre", per="pos")
    print(
        f"logit difference: clean {float(resid.clean.mean()):.2f}, "
        f"corrupted {float(resid.corrupted.mean()):.2f}"
    )
    recovery = resid.normalized()
    for layer in range(model.cfg.n_layers):
        pos = int(recovery[layer].argmax())
        print(f"resid_pre L{layer}: best position {pos} restores {float(recovery[layer, pos]):.2f}")

    heads = activation_patch(model, clean, corrupted, metric, "z", per="head")
    frame = heads.to_frame().sort_values("normalized", ascending=False)
    print("\nper-head recovery (denoising):")
    print(frame[["layer", "head", "normalized"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
