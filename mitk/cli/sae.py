"""``mitk sae train`` / ``mitk sae eval``: sparse autoencoders on a model's activations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from mitk.atomic import atomic_write
from mitk.checkpoint import require_checkpoint
from mitk.cli.common import DeviceOption, DtypeOption, JsonOption, ModelOption, QuietOption, emit
from mitk.cli.inputs import (
    MAX_SEED,
    InductionOption,
    SeedOption,
    check_one_source,
    read_token_matrix,
)
from mitk.cli.outputs import check_output_dir, check_output_file, hold_output_lock
from mitk.config import json_object
from mitk.config.field_types import check_types
from mitk.errors import ConfigError
from mitk.sae import ActivationStore, SAEConfig, SparseAutoencoder, evaluate, train
from mitk.sae.distributed import current_world
from mitk.sae.files import EXACT_FILE
from mitk.sae.saelens_format import CONFIG_FILE, WEIGHTS_FILE
from mitk.sae.tokens import as_token_source
from mitk.sweeps import load_named_model
from mitk.sweeps.reading import read_text

app = typer.Typer(
    help="Train and evaluate sparse autoencoders on a model's activations.",
    no_args_is_help=True,
)

TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--tokens",
        help="Token ids: JSONL of equal-length id lists, a .safetensors file with a 'tokens' "
        "tensor, or a directory of token shards.",
    ),
]
TextOption = Annotated[
    Path | None, typer.Option("--text", help="UTF-8 text file, tokenised by the model's tokenizer.")
]
SequencesOption = Annotated[
    int, typer.Option("--n-sequences", min=1, help="How many synthetic --induction sequences.")
]
ContextOption = Annotated[
    int | None,
    typer.Option(min=1, help="Tokens per sequence (default: the source's; text: n_ctx)."),
]
_SAVED_FILES = {WEIGHTS_FILE, CONFIG_FILE, EXACT_FILE}


def _token_source(
    net: Any, tokens: Path | None, text: Path | None, induction: int | None, n: int, seed: int
) -> torch.Tensor | Path:
    check_one_source(tokens=tokens, text=text, induction=induction)
    if text is not None:
        return text  # the store tokenises it, in rows of the context size
    return read_token_matrix(net, tokens_file=tokens, induction=induction, n_sequences=n,
                             seed=seed)  # fmt: skip


def _config_fields(config: Path | None) -> dict[str, Any]:
    """The ``--config`` JSON object, each known field of its annotated type (else exit 2)."""
    if config is None:
        return {}
    fields = json_object(read_text(config, "SAE config file"), str(config))
    check_types(SAEConfig, fields, prefix=f"{config}: ")
    return fields


def _sae_config(
    config: Path | None, fields: dict[str, Any], options: dict[str, Any], d_in: int, hook: str,
    expansion: int | None,
) -> SAEConfig:  # fmt: skip
    """``--config`` fields, overridden by the options given (not None), with the hook's width."""
    fields = dict(fields)
    if fields.get("d_in", d_in) != d_in:
        raise ConfigError(f"{config} has d_in={fields['d_in']}, but {hook!r} is {d_in} wide")
    fields.update({name: value for name, value in options.items() if value is not None})
    if options.get("d_sae") is not None and expansion is not None:
        raise ConfigError("give --d-sae or --expansion, not both")
    if expansion is not None or "d_sae" not in fields:
        fields["d_sae"] = (expansion or 8) * d_in
    return SAEConfig.from_dict({**fields, "d_in": d_in, "hook_name": hook})


def _check_out(out: Path) -> None:
    """Refuse early (before training) a folder ``save`` would refuse to replace."""
    check_output_dir(out, "--out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _SAVED_FILES)
        if foreign:
            raise ConfigError(f"--out {out} holds other files ({', '.join(foreign[:3])}); "
                              "it is replaced whole, so pick a new or empty folder")  # fmt: skip


def training_log_path(out: Path) -> Path:
    """Where ``--log-csv`` writes the metrics: ``<out>.log.csv`` beside the SAE folder."""
    return out.with_name(f"{out.name}.log.csv")


@app.command("train")
def train_command(
    ctx: typer.Context,
    model: ModelOption,
    hook: Annotated[str, typer.Option(help="Hook point to read, e.g. blocks.0.hook_resid_post.")],
    out: Annotated[Path, typer.Option(help="Folder to save the trained SAE in.")],
    tokens: TokenFileOption = None,
    text: TextOption = None,
    induction: InductionOption = None,
    n_sequences: SequencesOption = 256,
    data_seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the data order and synthetic data.")
    ] = 0,
    context_size: ContextOption = None,
    config: Annotated[Path | None, typer.Option(help="SAEConfig JSON; options override.")] = None,
    architecture: Annotated[
        str | None,
        typer.Option(help="relu|topk|batchtopk|jumprelu|gated|matryoshka_batchtopk"),
    ] = None,
    d_sae: Annotated[int | None, typer.Option(help="Number of latents.")] = None,
    expansion: Annotated[int | None, typer.Option(help="d_sae / d_in (default 8).")] = None,
    k: Annotated[int | None, typer.Option(help="Active latents per row (topk, batchtopk).")] = None,
    l1_coefficient: Annotated[float | None, typer.Option(help="relu/gated: L1 weight.")] = None,
    l0_coefficient: Annotated[float | None, typer.Option(help="jumprelu: L0 weight.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak Adam learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Activation rows per step.")] = None,
    total_tokens: Annotated[int | None, typer.Option(help="Activation rows in training.")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, max=MAX_SEED, help="Seed of the initialisation.")
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Steps between metrics.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    checkpoint_seconds: Annotated[
        float | None, typer.Option(help="Also checkpoint every this many seconds (0: off).")
    ] = None,
    normalize: Annotated[bool, typer.Option(help="Scale inputs to mean norm sqrt(d_in).")] = True,
    model_batch_size: Annotated[int, typer.Option(min=1, help="Sequences per model forward.")] = 32,
    buffer_batches: Annotated[int, typer.Option(min=1, help="Batches per shuffled chunk.")] = 32,
    activation_cache: Annotated[
        Path | None, typer.Option(help="Cache activation chunks here (safetensors shards).")
    ] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Write checkpoints here.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --checkpoint-dir's last.")] = False,
    log_csv: Annotated[bool, typer.Option(help="Write metrics to <out>.log.csv.")] = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train one SAE on the activations at --hook and save it to --out.

    Data: exactly one of --tokens, --text or --induction N. SAEConfig
    fields come from --config JSON, then from the options given. Prints
    the final L0, FVU and dead fraction.

    Several processes: torchrun --nproc-per-node N -m mitk sae train ...
    splits each batch across them (gloo on CPU, NCCL on GPUs); rank 0
    logs, writes checkpoints and saves the SAE.
    """
    if resume and checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir")
    if resume and checkpoint_dir is not None:
        require_checkpoint(checkpoint_dir)  # before any work: nothing to resume is an input error
    _check_out(out)
    log_path = training_log_path(out) if log_csv else None
    check_output_file(log_path, "--log-csv")
    check_output_dir(checkpoint_dir, "--checkpoint-dir")
    check_output_dir(activation_cache, "--activation-cache")
    file_fields = _config_fields(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes these
        for target, option in ((out, "--out"), (checkpoint_dir, "--checkpoint-dir")):
            if target is not None:
                hold_output_lock(ctx, target, option)
    net = load_named_model(model, device, dtype)
    data = _token_source(net, tokens, text, induction, n_sequences, data_seed)
    options = {
        "architecture": architecture, "d_sae": d_sae, "k": k, "l1_coefficient": l1_coefficient,
        "l0_coefficient": l0_coefficient, "lr": lr, "batch_size": batch_size,
        "total_tokens": total_tokens, "seed": seed, "log_every": log_every,
        "checkpoint_every": checkpoint_every, "checkpoint_seconds": checkpoint_seconds,
    }  # fmt: skip
    file_batch = file_fields.get("batch_size", SAEConfig.__dataclass_fields__["batch_size"].default)
    store = ActivationStore(
        net, hook, data, batch_size=batch_size or file_batch, context_size=context_size,
        model_batch_size=model_batch_size, buffer_batches=buffer_batches, normalize=normalize,
        cache_dir=activation_cache, seed=data_seed,
    )  # fmt: skip
    hook_name = store.hook_names[0]
    cfg = _sae_config(config, file_fields, options, store.d_in[hook_name], hook_name, expansion)
    result = train(cfg, store, checkpoint_dir=checkpoint_dir, resume=resume,
                   progress=not (quiet or as_json), log_csv=log_path, device=device)  # fmt: skip
    world = current_world()
    if world.is_main:
        result.sae.save(out)
    world.finish()
    if not world.is_main:
        return
    last = result.history[-1] if result.history else {}
    metrics = {key.split("/", 1)[1]: value for key, value in last.items() if "/" in key}
    summary = {
        "model": model,
        "hook": hook_name,
        "out": str(out),
        "log_csv": None if log_path is None else str(log_path),
        "steps": cfg.total_steps,
        "config": cfg.to_dict(),
        "metrics": metrics,
    }
    lines = [
        f"trained {cfg.architecture} SAE {cfg.d_in} -> {cfg.d_sae} on {hook_name} "
        f"({cfg.total_steps} steps of {cfg.batch_size} rows)",
        "final L0 {l0:.2f}, FVU {fvu:.4f}, dead fraction {dead_fraction:.3f}".format(
            **{"l0": float("nan"), "fvu": float("nan"), "dead_fraction": float("nan"), **metrics}
        ),
        f"saved to {out}" + (f"; metrics in {log_path}" if log_path else ""),
    ]
    emit(summary, as_json, quiet, lines)


@app.command("eval")
def eval_command(
    sae: Annotated[Path, typer.Option(help="SAE folder (mitk or SAELens format).")],
    model: ModelOption,
    tokens: TokenFileOption = None,
    text: TextOption = None,
    induction: InductionOption = None,
    n_sequences: SequencesOption = 64,
    seed: SeedOption = 0,
    context_size: ContextOption = None,
    hook: Annotated[str | None, typer.Option(help="Hook to splice at (default: SAE's).")] = None,
    sequences_per_batch: Annotated[int, typer.Option(min=1, help="Sequences per forward.")] = 8,
    out: Annotated[Path | None, typer.Option(help="Write the metrics to this parquet.")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Measure an SAE in the model: L0, FVU, dead latents, CE loss recovered.

    Runs up to --n-sequences sequences clean, with the SAE's reconstruction
    at its hook, and with the hook zero-ablated; the reconstruction metrics
    come from the spliced runs.
    """
    check_output_file(out, "--out")
    net = load_named_model(model, device, dtype)
    autoencoder = SparseAutoencoder.load(sae, device=device)
    data = _token_source(net, tokens, text, induction, n_sequences, seed)
    source = as_token_source(data, net, context_size)
    count = min(n_sequences, source.n_sequences)
    sequences = source.sequences(torch.arange(count))[:, : context_size or source.context_size]
    result = evaluate(autoencoder, model=net, tokens=sequences, hook_name=hook,
                      sequences_per_batch=sequences_per_batch)  # fmt: skip
    if out is not None:
        frame = result.to_frame()
        atomic_write(out, lambda temp: frame.to_parquet(temp, index=False))
    summary = {"sae": str(sae), "model": model, "hook": result.hook_name, "sequences": count,
               **result.to_dict(), "rows": result.rows, "notes": list(result.notes)}  # fmt: skip
    shown = ("l0", "fvu", "explained_variance", "dead_fraction", "ce_loss_clean",
             "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_recovered")  # fmt: skip
    lines = [f"SAE {sae} at {result.hook_name} on {count} sequences ({result.rows} rows):"]
    lines += [f"  {name:<22} {summary[name]:.4f}" for name in shown if name in summary]
    lines += [f"note: {note}" for note in result.notes]
    if out is not None:
        lines.append(f"metrics written to {out}")
    emit(summary, as_json, quiet, lines)
