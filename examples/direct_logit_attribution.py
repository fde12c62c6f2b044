"""Direct logit attribution per head on the embedded model; the parts sum to the logit.

Run: python examples/direct_logit_attribution.py
"""

from __future__ import annotations

import torch

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.sequences import repeated_random_tokens


def main() -> None:
    model = HookedTransformer.from_pretrained("toy-induction")
    tokens = repeated_random_tokens(16, 20, model.cfg.d_vocab, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    # the second-to-last position must predict the last token, seen once in the first copy
    dla = logit_attribution(model, cache, tokens[:, -1], pos=-2, by="head")
    error = float((dla.total() - dla.actual).abs().max())
    assert error < 1e-3, f"attributions do not sum to the logit (off by {error})"
    print(
        f"mean logit of the correct token: {float(dla.actual.mean()):.3f} "
        f"(sum of attributions matches to {error:.1e})"
    )
    print("largest direct contributions (mean over prompts):")
    for label, value in dla.top(6):
        print(f"  {label:<14} {value:+.3f}")


if __name__ == "__main__":
    main()
