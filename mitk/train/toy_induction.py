"""Recipe for the embedded ``toy-induction`` model: a 2-layer attention-only transformer.

Reproduce the shipped weights with::

    python -m mitk.train.toy_induction --out mitk/data/models/toy-induction

Training takes a few minutes on two CPU cores and is deterministic for a given
seed and torch build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mitk.config import TransformerConfig
from mitk.model import HookedTransformer
from mitk.sequences import periodic_segments, repeated_random_tokens
from mitk.train.loop import TrainConfig, train_language_model

MODEL = TransformerConfig(
    d_model=64,
    n_layers=2,
    n_heads=4,
    d_vocab=256,
    n_ctx=64,
    d_mlp=0,
    act_fn="gelu",
    attn_out_bias=True,
    architecture="mitk-attn-only",
    default_prepend_bos=True,
    extra={"trained_on": "periodic random segments (mitk.sequences)", "bos": 0},
)
TRAIN = TrainConfig(steps=2000, lr=1e-3, warmup=100, weight_decay=0.05, checkpoint_every=500)
BATCH, SEQ_LEN, SEED = 64, 64, 0


def batch_for_step(step: int) -> torch.Tensor:
    """The training batch at ``step``: seeded by the step so resumed runs see the same data."""
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + step)
    return periodic_segments(BATCH, SEQ_LEN, MODEL.d_vocab, gen)


def induction_loss_gap(
    model: HookedTransformer, half: int = 24, batch: int = 64
) -> tuple[float, float]:
    """Mean loss on the first and on the repeated half of fresh repeated random sequences."""
    tokens = repeated_random_tokens(
        batch, half, model.cfg.d_vocab, torch.Generator().manual_seed(99)
    )
    with torch.no_grad():
        logits = model(tokens)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
    ).view(batch, -1)
    return nll[:, :half].mean().item(), nll[:, half + 1 :].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to save the trained model")
    parser.add_argument("--checkpoints", type=Path, default=None, help="resumable checkpoint dir")
    parser.add_argument("--steps", type=int, default=TRAIN.steps)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --checkpoints"
    )
    args = parser.parse_args()
    torch.manual_seed(SEED)
    model = HookedTransformer(MODEL, seed=SEED)
    cfg = TrainConfig(**{**TRAIN.__dict__, "steps": args.steps})
    train_language_model(model, batch_for_step, cfg, args.checkpoints, resume=args.resume)
    first, repeat = induction_loss_gap(model)
    print(f"loss on first half {first:.3f}, on repeated half {repeat:.3f}")
    model.save(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
