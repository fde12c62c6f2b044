"""The demo's name swap: clean and corrupted prompts that differ in one word, chosen by measuring.

Each candidate is a template with one slot and pairs ``(fill, answer)``: the
clean prompt fills the slot with one pair's ``fill`` and should predict its
``answer`` next; the corrupted prompt fills in another pair's. The metric is
the logit difference between the two answers at the last position. Which
template the report uses is decided at run time: the one on which the model
gets both prompts of the most pairs right (clean difference > 0, corrupted
< 0), so a retrained model picks its own example and nothing is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import torch

from mitk.analysis.patching import PatchResult, activation_patch, logit_diff
from mitk.model import HookedTransformer

NAMES = ("Valentine", "Proteus", "Julia", "Silvia", "Romeo", "Juliet", "Hamlet", "Brutus",
         "Caesar", "Iago", "Kate", "Falstaff")  # fmt: skip
"""Names repeated within a dialogue: the model must copy the one the context used."""

TITLES = (
    ("Sir", "John"),
    ("King", "Richard"),
    ("Queen", "Margaret"),
    ("Lady", "Macbeth"),
    ("Mark", "Antony"),
    ("Friar", "Laurence"),
    ("Duke", "Frederick"),
)
"""A title and the name that most often follows it in the plays."""

TEMPLATES: tuple[tuple[str, bool], ...] = (
    (
        "PROTEUS.\nWilt thou be gone? Sweet {}, adieu!\n\nVALENTINE.\nFarewell.\n\nPROTEUS.\n"
        "Farewell, sweet",
        False,
    ),
    ("JULIA.\nWhere is {}? I must speak with him.\n\nLUCETTA.\nHere comes", False),
    ("O {}, {}! wherefore art thou gone? Come back, good", False),
    ("Here comes {}", True),
    ("[Enter {}", True),
)
"""Templates with a slot ``{}`` (each occurrence gets the same word); True: it takes a title."""


@dataclass(frozen=True)
class NameSwap:
    """The chosen prompts, their answers, the model's logit differences and the patching results."""

    template: str
    clean: list[str]
    corrupted: list[str]
    answers: list[tuple[str, str]]
    """Per pair (clean answer, corrupted answer), as words."""
    clean_diff: list[float]
    corrupted_diff: list[float]
    right: int
    """Pairs on which the model prefers the right answer in both prompts."""
    tried: int
    """Pairs measured over all templates."""
    by_position: PatchResult
    by_head: PatchResult
    str_tokens: list[str]
    """The first clean prompt's tokens, labelling positions."""


def _single_token(model: HookedTransformer, word: str) -> int | None:
    ids = model.tokenizer.encode(" " + word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _pairs(model: HookedTransformer, titles: bool) -> list[tuple[str, int]]:
    """(fill word, answer id) for every fill whose answer is one token."""
    pool = TITLES if titles else tuple((name, name) for name in NAMES)
    found = []
    for fill, answer in pool:
        answer_id = _single_token(model, answer)
        if answer_id is not None and _single_token(model, fill) is not None:
            found.append((fill, answer_id))
    return found


def _measure(
    model: HookedTransformer, template: str, fills: list[str], answers: list[int]
) -> torch.Tensor:
    """``[fill, fill]`` logit of answer i minus answer j at the end of the prompt filled with i."""
    prompts = [template.format(*[fill] * template.count("{}")) for fill in fills]
    with torch.no_grad():
        last = model(model.to_tokens(prompts))[:, -1]
    chosen = last[:, torch.tensor(answers)]  # [prompt, answer]
    return chosen.diagonal()[:, None] - chosen


def choose_name_swap(model: HookedTransformer, max_pairs: int = 8) -> NameSwap:
    """Measure every template and pair, keep the best template's best pairs, and patch them.

    With no template right on any pair the best-scoring pairs are kept anyway;
    ``right`` says so (0), and the report shows the model's actual preferences.
    """
    best: tuple[tuple[int, float], str, list[tuple[int, int, float]], list[str], list[int]] | None
    best, tried = None, 0
    for template, titles in TEMPLATES:
        pairs = _pairs(model, titles)
        if len(pairs) < 2:
            continue
        fills, answers = [f for f, _ in pairs], [a for _, a in pairs]
        diff = _measure(model, template, fills, answers)
        # (clean i, corrupted j, margin): margin > 0 when each prompt prefers its own answer
        scored = [
            (i, j, min(float(diff[i, j]), float(diff[j, i])))
            for i, j in permutations(range(len(fills)), 2)
        ]
        tried += len(scored)
        scored.sort(key=lambda s: -s[2])
        n_right = sum(s[2] > 0 for s in scored)
        key = (n_right, sum(s[2] for s in scored[:max_pairs]))
        if best is None or key > best[0]:
            right = [s for s in scored[:max_pairs] if s[2] > 0]
            best = (key, template, right or scored[:1], fills, answers)
    if best is None:
        raise ValueError("the model's tokenizer has no single-token names for the name swap")
    (n_right, _), template, chosen, fills, answers = best
    fill = lambda word: template.format(*[word] * template.count("{}"))  # noqa: E731
    clean = [fill(fills[i]) for i, _, _ in chosen]
    corrupted = [fill(fills[j]) for _, j, _ in chosen]
    right_ids = torch.tensor([answers[i] for i, _, _ in chosen])
    wrong_ids = torch.tensor([answers[j] for _, j, _ in chosen])
    clean_tokens, corrupted_tokens = model.to_tokens(clean), model.to_tokens(corrupted)
    metric = logit_diff(right_ids, wrong_ids, pos=-1)
    with torch.no_grad():
        clean_diff = metric(model(clean_tokens)[:, -1]).tolist()
        corrupted_diff = metric(model(corrupted_tokens)[:, -1]).tolist()
    decode = model.tokenizer.decode
    return NameSwap(
        template=template,
        clean=clean,
        corrupted=corrupted,
        answers=[
            (decode([int(a)]).strip(), decode([int(b)]).strip())
            for a, b in zip(right_ids, wrong_ids, strict=True)
        ],
        clean_diff=clean_diff,
        corrupted_diff=corrupted_diff,
        right=n_right,
        tried=tried,
        by_position=activation_patch(
            model, clean_tokens, corrupted_tokens, metric, "resid_pre", "pos"
        ),
        by_head=activation_patch(model, clean_tokens, corrupted_tokens, metric, "z", "head"),
        str_tokens=model.to_str_tokens(clean[0]),
    )
