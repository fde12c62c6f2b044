"""``mitk dla``: direct logit attribution of an answer, checked against the model's own logit."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import Tensor
import typer

from mitk.analysis.dla import logit_attribution
from mitk.atomic import atomic_write
from mitk.cli.common import DeviceOption, DtypeOption, JsonOption, ModelOption, QuietOption, emit
from mitk.cli.inputs import (
    AnswerOption,
    CountOption,
    InductionOption,
    PromptOption,
    SeedOption,
    TokensOption,
    WrongOption,
    check_cache_fits,
    read_prompts,
)
from mitk.cli.outputs import check_output_file
from mitk.errors import ConfigError
from mitk.sweeps import load_named_model


class Granularity(str, Enum):
    """What one attribution row is: a sublayer, a head, an MLP neuron or an MoE expert."""

    component = "component"
    head = "head"
    neuron = "neuron"
    expert = "expert"


def _model_logit_diff(
    logits: Tensor, positions: Tensor, answers: Tensor, wrong: Tensor | None
) -> Tensor:
    """The logit (difference) the forward itself produced, per prompt."""
    rows = torch.arange(logits.shape[0])
    at = logits[rows, positions.to(logits.device)].float()  # [batch, d_vocab]
    value = at[rows, answers.to(at.device)]
    return value if wrong is None else value - at[rows, wrong.to(at.device)]


def dla(
    model: ModelOption,
    prompt: PromptOption = None,
    tokens: TokensOption = None,
    induction: InductionOption = None,
    n_prompts: CountOption = 16,
    seed: SeedOption = 0,
    answer: AnswerOption = None,
    wrong: WrongOption = None,
    pos: Annotated[int, typer.Option(help="Position read; negative counts from the end.")] = -1,
    by: Annotated[Granularity, typer.Option(help="Row per component, head, neuron or expert.")] = (
        Granularity.component
    ),
    top: Annotated[
        int, typer.Option(min=1, help="How many of the largest contributions to show.")
    ] = 10,
    out: Annotated[Path | None, typer.Option(help="Write every row to this parquet file.")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Attribute the answer's logit (minus --wrong's) to each direct write.

    The parts (with the final norm's bias and b_U) sum to the model's logit
    (difference); both are printed, averaged over prompts, to check it.

    A negative --pos counts back from each prompt's last real token.
    """
    check_output_file(out, "--out")
    net = load_named_model(model, device, dtype)
    prompts = read_prompts(net, prompt=prompt, tokens_file=tokens, induction=induction,
                           n_prompts=n_prompts, seed=seed, answer=answer, wrong=wrong)  # fmt: skip
    if prompts.answers is None:
        raise ConfigError("dla needs answers: pass --answer, or a token file that holds them")
    positions = prompts.positions(pos)
    check_cache_fits(net, prompts.tokens)
    mask = prompts.attention_mask
    device_tokens = prompts.tokens.to(net.W_E.device)
    with torch.no_grad():
        logits, cache = net.run_with_cache(
            device_tokens, None if mask is None else mask.to(device_tokens.device)
        )
    attribution = logit_attribution(
        net, cache, prompts.answers, prompts.wrong, pos=positions, by=by.value
    )
    parts = attribution.total().float().cpu()
    actual = _model_logit_diff(logits, positions, prompts.answers, prompts.wrong).cpu()
    gap = float((parts - actual).abs().max())
    tolerance = 1e-4 * max(1.0, float(actual.abs().max())) if dtype in ("float32", "float64") \
        else 5e-2 * max(1.0, float(actual.abs().max()))  # fmt: skip
    if out is not None:
        frame = attribution.to_frame()
        frame["by"] = by.value
        atomic_write(out, lambda temp: frame.to_parquet(temp, index=False))
    what = "logit difference" if prompts.wrong is not None else "logit"
    result: dict[str, Any] = {
        "model": model,
        "prompts": prompts.source,
        "n_prompts": int(prompts.tokens.shape[0]),
        "by": by.value,
        "metric": what,
        "top": [{"component": c, "attribution": v} for c, v in attribution.top(top)],
        "sum_of_parts": float(parts.mean()),
        "model_logit_diff": float(actual.mean()),
        "max_gap": gap,
        "identity_holds": gap <= tolerance,
        "out": None if out is None else str(out),
    }
    lines = [f"direct logit attribution of the {what} at pos {pos}, by {by.value} "
             f"({prompts.source}; mean over prompts):"]  # fmt: skip
    lines += [f"  {row['component']:<16} {row['attribution']:+.4f}" for row in result["top"]]
    check = "identity holds" if result["identity_holds"] else "IDENTITY FAILS"
    lines.append(f"sum of parts {result['sum_of_parts']:+.5f} = model {what} "
                 f"{result['model_logit_diff']:+.5f} ({check}; max gap {gap:.2e})")  # fmt: skip
    if out is not None:
        lines.append(f"rows written to {out}")
    emit(result, as_json, quiet, lines)
