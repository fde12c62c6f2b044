"""Write a self-contained HTML dashboard of the embedded model's induction circuit.

Run: python examples/dashboard.py [OUT.html]   (default: a file in a temporary directory)
"""

from __future__ import annotations

from pathlib import Path
import sys
import tempfile

import torch

from mitk import HookedTransformer
from mitk.analysis.composition import composition_baseline, composition_scores
from mitk.analysis.detectors import head_detector_scores
from mitk.analysis.dla import logit_attribution
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.sequences import repeated_random_tokens
from mitk.viz import Section, composition_heatmap, dashboard, head_scores_heatmap


def main() -> None:
    default = Path(tempfile.mkdtemp(prefix="mitk-dashboard-")) / "report.html"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    model = HookedTransformer.from_pretrained("toy-induction")
    half, gen = 20, torch.Generator().manual_seed(0)
    clean = repeated_random_tokens(16, half, model.cfg.d_vocab, gen)
    corrupted = clean.clone()  # a different first copy: nothing to copy from
    corrupted[:, 1 : half + 1] = torch.randint(1, model.cfg.d_vocab, (16, half), generator=gen)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    scores = head_detector_scores(model)
    k_comp, baseline = composition_scores(model, "K"), composition_baseline(model, "K")
    metric = logit_diff(clean[:, -1], corrupted[:, half], pos=-2)
    items = [
        # result objects get their default figures; figures and tables go in as they are
        logit_attribution(model, cache, clean[:, -1], pos=-2, by="head"),
        head_scores_heatmap(scores, "previous_token"),
        head_scores_heatmap(scores, "induction"),
        Section(
            "K-composition",
            composition_heatmap(k_comp, baseline.mean),
            note=f"Random baseline {baseline.mean:.3f} ± {baseline.std:.3f}.",
        ),
        activation_patch(model, clean, corrupted, metric, "z", per="head"),
        scores.round(3),
    ]
    header = {"model": "toy-induction", "prompts": f"16 x (BOS + {half} random tokens, twice)"}
    path = dashboard(out, title="toy-induction: induction circuit", header=header, items=items)
    print(f"report written to {path.resolve()} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
