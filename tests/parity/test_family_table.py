"""The README's table of supported families states what each one supports: checked here.

For one random checkpoint per Hugging Face ``model_type`` (the builders the parity suites
use), each capability is tried on mitk's load: greedy ``generate`` (with the key-value
cache, else without it), each weight-processing step on its own, and direct logit
attribution by component, head, neuron and (mixture-of-experts models) expert. The table
these answers make must be the README's, row for row, so the table cannot drift from the
code; on a mismatch the message holds the table to paste.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
from pathlib import Path
import re

import pytest
import torch
from torch import nn

from mitk import HookedTransformer
from mitk.analysis.dla import logit_attribution
from mitk.errors import MitkError
from mitk.model import supported_architectures
from tests.checkpoints import gpt2_hf_model
from tests.parity import test_hf_families as families
from tests.parity.hf_moe_builders import MOE_FAMILIES
from tests.parity.test_hf_bamba import _build as _bamba
from tests.parity.test_hf_big_bird import hf_model as _big_bird
from tests.parity.test_hf_longformer import _build as _longformer
from tests.parity.test_hf_mamba import _mamba, _mamba2
from tests.parity.test_hf_nystromformer import hf_model as _nystromformer
from tests.parity.test_hf_rwkv import _build as _rwkv

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- family table: checked by tests/parity/test_family_table.py -->"
STEPS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    return BertModel(cfg)


REPRESENTATIVES: dict[str, Callable[[], nn.Module]] = {
    "bamba": lambda: _bamba("bamba"),
    "bert": _bert,
    "big_bird": _big_bird,
    "bloom": families.FAMILIES["bloom-alibi-8-heads"],
    "cohere": families.FAMILIES["cohere-parallel-shared-norm-interleaved"],
    "deepseek_v2": MOE_FAMILIES["deepseek-v2-moe-shared-scaled"],
    "gemma": families.FAMILIES["gemma-gqa-head-dim"],
    "gemma2": families.FAMILIES["gemma2-window-logit-softcap"],
    "gemma3_text": families.FAMILIES["gemma3-local-global-linear-8-logit-softcap"],
    "gpt2": gpt2_hf_model,
    "gpt_neo": families.FAMILIES["gpt-neo-global-local-window-4"],
    "gpt_neox": families.FAMILIES["gpt-neox-parallel-partial-rotary"],
    "gpt_oss": MOE_FAMILIES["gpt-oss-sinks-window-4-yarn-clamped"],
    "gptj": families.FAMILIES["gptj-interleaved-partial-rotary"],
    "granite": families.FAMILIES["granite-multipliers-gqa"],
    "llama": families.FAMILIES["llama-gqa"],
    "longformer": _longformer,
    "mamba": _mamba,
    "mamba2": lambda: _mamba2(num_heads=8, head_dim=8),
    "mistral": families.FAMILIES["mistral-window-4"],
    "mixtral": MOE_FAMILIES["mixtral-top2-of-4"],
    "nystromformer": lambda: _nystromformer(landmarks=2, taps=3),
    "olmo2": families.FAMILIES["olmo2-post-norms-projection-qk-norms"],
    "olmoe": MOE_FAMILIES["olmoe-top3-unnormed"],
    "phi3": families.FAMILIES["phi3-packed-gqa"],
    "qwen2": families.FAMILIES["qwen2"],
    "qwen2_moe": MOE_FAMILIES["qwen2-moe-shared-expert-dense-layer-0"],
    "qwen3": families.FAMILIES["qwen3-head-qk-norms"],
    "qwen3_moe": MOE_FAMILIES["qwen3-moe-normed-top-k-dense-layer-1"],
    "rwkv": lambda: _rwkv("rwkv-rescaled"),
    "smollm3": families.FAMILIES["smollm3-nope-on-layer-1"],
    "stablelm": families.FAMILIES["stablelm-quarter-rotary-qkv-bias"],
    "starcoder2": families.FAMILIES["starcoder2-biased-window-4"],
}


def _works(action: Callable[[], object]) -> bool:
    try:
        action()
    except MitkError:
        return False
    return True


def _row(model_type: str, model: HookedTransformer) -> str:
    tokens = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    if not model.cfg.has_lm_head:
        generate = "no (encoder)"
    else:
        greedy = {"max_new_tokens": 2, "do_sample": False, "verbose": False, "stop_at_eos": False}
        cached = _works(lambda: model.generate(tokens, **greedy))
        uncached = _works(lambda: model.generate(tokens, use_past_kv_cache=False, **greedy))
        generate = "yes" if cached else "without KV cache" if uncached else "no"
    steps = [
        s for s in STEPS if _works(lambda s=s: copy.deepcopy(model).process_weights(**{s: True}))
    ]
    processing = ", ".join(f"`{s}`" for s in steps) or "none"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, return_type="hidden")
    answers, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    dla = [
        by
        for by in ("component", "head", "neuron", "expert")
        if model.cfg.has_lm_head
        and _works(lambda by=by: logit_attribution(model, cache, answers, wrong, by=by))
    ]
    return f"| `{model_type}` | {generate} | {processing} | {', '.join(dla) or 'none'} |"


def _table() -> str:
    rows = []
    for model_type, build in sorted(REPRESENTATIVES.items()):
        torch.manual_seed(0)
        hf = build()
        rows.append(_row(model_type, HookedTransformer.from_pretrained(hf.eval())))
    header = (
        "| family (`model_type`) | `generate` | weight processing | DLA by |\n|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def test_every_supported_family_has_a_representative() -> None:
    assert sorted(REPRESENTATIVES) == supported_architectures()


@pytest.mark.slow
def test_readme_family_table_states_what_each_family_supports() -> None:
    text = README.read_text()
    assert MARKER in text, f"README.md lacks the marker {MARKER!r} above the family table"
    after = text.split(MARKER, 1)[1].lstrip("\n")
    match = re.match(r"((?:\|.*\|\n)+)", after)
    assert match, "no markdown table right after the family-table marker in README.md"
    expected = _table()
    assert match.group(1).strip() == expected, f"README's family table should read:\n{expected}"
