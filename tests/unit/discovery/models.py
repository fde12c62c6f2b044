"""Models and prompts the discovery tests share: tiny random models, the toy, a planted circuit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mitk import HookedTransformer, TransformerConfig
from mitk.analysis.detectors import head_detector_scores
from mitk.analysis.discovery import Circuit, Prompts
from mitk.sequences import repeated_random_tokens


def tiny(kind: str = "mha", seed: int = 3) -> HookedTransformer:
    """A small random model: ``mha`` (GPT-2 style), ``gqa`` (llama style), ``parallel`` (NeoX)."""
    common = dict(d_model=32, n_heads=4, d_vocab=40, n_ctx=16)
    configs = {
        "mha": TransformerConfig(n_layers=3, **common),
        "gqa": TransformerConfig(
            n_layers=2,
            n_key_value_heads=2,
            positional="rotary",
            normalization="rmsnorm",
            gated_mlp=True,
            act_fn="silu",
            **common,
        ),
        "parallel": TransformerConfig(n_layers=2, parallel_attn_mlp=True, **common),
        "attn_only": TransformerConfig(n_layers=2, d_mlp=0, **common),
    }
    return HookedTransformer(configs[kind], seed=seed)


def random_pair(batch: int = 3, seq: int = 8, vocab: int = 40, seed: int = 1) -> Prompts:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=gen)
    return Prompts(clean, torch.randint(0, vocab, (batch, seq), generator=gen))


class LastLogit:
    """Metric: the logit of one token at the last position (any model, any prompts)."""

    def __init__(self, token: int = 0) -> None:
        self.token = token

    def __call__(self, logits: Tensor) -> Tensor:
        return logits[:, -1, self.token]


class InductionLogProb:
    """Metric: mean log-probability of the clean next token over the repeated half."""

    def __init__(self, clean: Tensor, half: int) -> None:
        self.targets, self.half = clean[:, half + 2 :], half

    def __call__(self, logits: Tensor) -> Tensor:
        log_probs = logits.log_softmax(-1)[:, self.half + 1 : -1]
        return log_probs.gather(-1, self.targets[..., None])[..., 0].mean(-1)


@dataclass(frozen=True)
class Induction:
    model: HookedTransformer
    prompts: Prompts
    metric: InductionLogProb
    previous: str  # the previous-token head, e.g. "L0H0"
    induction: list[str]  # the induction heads


def toy_induction(batch: int = 8, half: int = 8) -> Induction:
    """The embedded toy on repeated random tokens (corrupted: unrepeated); heads from detectors."""
    model = HookedTransformer.from_pretrained("toy-induction")
    gen = torch.Generator().manual_seed(0)
    clean = repeated_random_tokens(batch, half, model.cfg.d_vocab, gen)
    corrupted = torch.randint(1, model.cfg.d_vocab, clean.shape, generator=gen)
    corrupted[:, 0] = clean[:, 0]
    scores = head_detector_scores(model)
    layer0 = scores[scores.layer == 0]
    previous = str(layer0.loc[layer0.previous_token.idxmax(), "label"])
    induction = scores[(scores.layer == 1) & (scores.induction > 0.5)]["label"].tolist()
    return Induction(
        model, Prompts(clean, corrupted), InductionLogProb(clean, half), previous, induction
    )


def planted() -> tuple[HookedTransformer, Prompts, LastLogit, Circuit]:
    """A hand-set attention-only model whose one working path is embed -> L0H0 -> L1H1 -> logits.

    Queries and keys are zero (every head averages its past uniformly). Tokens
    are one-hot in dims 0-3 plus a large constant in dim 12, so the RMS norms
    barely depend on anything else; L0H0 copies dims 0-3 into 4-7, L1H1 copies
    4-7 into 8-11, the unembedding reads 8-11 (the metric moves by several units).
    Every other head writes nothing. The plant: embed -> L0H0.v -> L1H1.v -> logits.
    """
    cfg = TransformerConfig(
        d_model=16, n_layers=2, n_heads=2, d_head=4, d_mlp=0, d_vocab=4, n_ctx=16,
        positional="none", normalization="rmsnorm", attn_qkv_bias=False, attn_out_bias=False,
    )  # fmt: skip
    model = HookedTransformer(cfg, seed=0)
    eye = torch.eye(4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.blocks:
            block.ln1.w.fill_(1.0)
        model.ln_final.w.fill_(1.0)
        model.embed.W_E[:, :4] = eye
        model.embed.W_E[:, 12] = 20.0
        for layer, head, src, dst in ((0, 0, 0, 4), (1, 1, 4, 8)):
            attn = model.blocks[layer].attn
            n, d = cfg.n_heads, cfg.d_head
            v_cols = slice((n + n + head) * d, (n + n + head + 1) * d)  # q heads, k heads, v heads
            attn.W_qkv[src : src + 4, v_cols] = eye
            attn.W_o_packed[head * d : (head + 1) * d, dst : dst + 4] = (
                5 * eye
            )  # undo the norm's 1/5
        model.unembed.W_U[8:12] = 20 * eye
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 4, (8, 6), generator=gen)
    corrupted = torch.randint(0, 4, (8, 6), generator=gen)
    plant = Circuit.of(model, [("embed", "L0H0.v"), ("L0H0", "L1H1.v"), ("L1H1", "logits")])
    return model, Prompts(clean, corrupted), LastLogit(0), plant
