"""Find the induction circuit: head detector scores, K-composition, and an ablation.

Run: python examples/induction_heads.py
"""

from __future__ import annotations

import torch

from mitk import HookedTransformer, hooks
from mitk.analysis.composition import composition_baseline, composition_scores
from mitk.analysis.detectors import head_detector_scores
from mitk.analysis.patching import mean_ablation
from mitk.sequences import repeated_random_tokens


def main() -> None:
    model = HookedTransformer.from_pretrained("toy-induction")
    scores = head_detector_scores(model, half=20, batch=32)
    prev = scores.loc[scores["previous_token"].idxmax()]
    induction = scores.query("induction > 0.5")
    print(scores.round(3).to_string(index=False))
    print(f"\nprevious-token head {prev['label']}; induction heads {list(induction['label'])}")

    k_comp = composition_scores(model, "K")
    baseline = composition_baseline(model, "K")
    for _, head in induction.iterrows():
        score = float(k_comp[prev["layer"], prev["head"], head["layer"], head["head"]])
        z = (score - baseline.mean) / baseline.std
        print(f"K-composition {prev['label']} -> {head['label']}: {score:.3f} ({z:+.0f} std)")

    half = 20
    gen = torch.Generator().manual_seed(1)
    tokens = repeated_random_tokens(16, half, model.cfg.d_vocab, gen)
    reference = repeated_random_tokens(64, half, model.cfg.d_vocab, gen)
    ablations = [
        mean_ablation(model, reference, hooks.name("z", int(layer)), head=int(head))
        for layer, head in induction[["layer", "head"]].itertuples(index=False)
    ]
    with torch.no_grad():
        for what, fwd_hooks in (("clean", []), ("induction heads ablated", ablations)):
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
            nll = -logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
            print(f"repeated-half loss, {what}: {float(nll[:, half + 1 :].mean()):.3f} nats")


if __name__ == "__main__":
    main()
