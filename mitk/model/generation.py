"""Autoregressive generation with a key-value cache: greedy or sampled, batched with left padding.

The prompt runs once; each later step feeds only the newest token and attends
to the keys and values the earlier steps left in a ``KVCache``. Positions (learned,
sinusoidal, rotary, ALiBi) are counted over real tokens, as in a padded forward,
so a left-padded row generates what it would generate alone.

Hooks: generation runs inside whatever ``model.hooks(...)`` context is active (or
``fwd_hooks=``). With the cache, hooks fire once on the prompt (``pos`` = prompt
length) and then once per new token with ``pos = 1`` (the new position only;
``key_pos`` in patterns grows). A hook that needs whole-sequence activations at
every step should pass ``use_past_kv=False``: each step then reruns the full
sequence (slower, same tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mitk.errors import UnsupportedModelError
from mitk.hooks import HookSpec
from mitk.model.attention import Attention
from mitk.model.inputs import check_length, checked_attention_mask, checked_tokens
from mitk.model.kv_cache import KVCache
from mitk.shapes import Bool, Float, Int


@dataclass
class GenerationResult:
    """What ``generate`` returns; ``tokens`` holds prompt and new tokens side by side.

    ``attention_mask`` is 1 at real tokens: 0 at prompt padding and at the
    ``pad_token_id`` filler written after a row's EOS. ``log_probs`` is each new
    token's log-probability under the model itself (before temperature or
    filtering), 0 at filler. ``text`` decodes each row's real tokens when a
    tokenizer is attached, else None.
    """

    tokens: Int[Tensor, "batch total"]
    attention_mask: Int[Tensor, "batch total"]
    prompt_len: int
    log_probs: Float[Tensor, "batch new"]
    text: list[str] | None = None

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        """The generated tokens only, ``[batch, new]``."""
        return self.tokens[:, self.prompt_len :]


def step(
    model: Any,  # a HookedTransformer; Any because transformer.py imports this module
    tokens: Int[Tensor, "batch new"],
    key_valid: Bool[Tensor, "batch key_pos"] | None,
    cache: KVCache,
) -> Float[Tensor, "batch d_vocab"]:
    """Run ``tokens`` after the cached positions; returns the last position's logits.

    ``key_valid`` covers every position, cached and new (``[batch, key_pos]``,
    True at real tokens), or is None when nothing is padded; its cached part must
    be what earlier steps were given. ``cache`` gains the new positions' keys and values.
    """
    # the cache keeps the mask of the positions it holds; the forward takes the new ones'
    new_valid = None if key_valid is None else key_valid[:, -tokens.shape[1] :]
    logits = model(tokens, attention_mask=new_valid, past_kv_cache=cache, logit_positions=-1)
    return logits[:, 0]


def sample(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """One token per row: argmax at ``temperature == 0``, else sampled after top-k then top-p.

    Top-p keeps the smallest set of most likely tokens whose mass reaches
    ``top_p`` (the most likely token always survives).
    """
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def generate(
    model: Any,  # a HookedTransformer
    input: Tensor | str | list[str],
    max_new_tokens: int = 20,
    *,
    attention_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_past_kv: bool = True,
    fwd_hooks: Sequence[HookSpec] = (),
) -> GenerationResult:
    """Extend each prompt by up to ``max_new_tokens`` tokens; see ``HookedTransformer.generate``."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if isinstance(input, str | list):
        if attention_mask is not None:
            raise ValueError("pass either text (the mask is built for you) or an attention_mask")
        input, attention_mask = model.tokenize(input, padding_side="left")
    device = model.W_E.device
    tokens = checked_tokens(input, model.cfg).to(device)
    key_valid = checked_attention_mask(attention_mask, (tokens.shape[0], tokens.shape[1]))
    if key_valid is not None:
        key_valid = key_valid.to(device)
        if not bool(key_valid[:, -1].all()):
            raise ValueError("generate needs left padding: every row's last token must be real")
    check_length(tokens.shape[1] + max_new_tokens, model.cfg)  # learned positions run out
    if use_past_kv and not all(isinstance(b.attn, Attention) for b in model.blocks):
        raise UnsupportedModelError(
            "this model's attention has no key-value cache support; pass use_past_kv=False"
        )
    stops = _eos_ids(model, eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else _default_pad(model, stops)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    batch, prompt_len = tokens.shape
    real = torch.ones_like(tokens) if key_valid is None else key_valid.long()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    log_probs: list[Tensor] = []
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad(), model.hooks(fwd_hooks):
        for _ in range(max_new_tokens):
            if use_past_kv:
                fresh = tokens if cache.length == 0 else tokens[:, -1:]
                logits = step(model, fresh, key_valid, cache)
            else:
                logits = model(tokens, attention_mask=key_valid, logit_positions=-1)[:, -1]
            chosen = sample(logits, temperature, top_k, top_p, generator)
            # finished rows get filler; their mask stays 1 so every row's keys look alike
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
            picked = logits.float().log_softmax(-1).gather(-1, chosen[:, None])[:, 0]
            log_probs.append(picked.masked_fill(done, 0.0))
            real = torch.cat([real, (~done).long()[:, None]], dim=1)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            if key_valid is not None:
                key_valid = torch.cat([key_valid, key_valid.new_ones(batch, 1)], dim=1)
            done = done | torch.isin(chosen, stops)
            if bool(done.all()):
                break
    text = None
    if model.tokenizer is not None:
        text = [model.to_string(row[keep.bool()]) for row, keep in zip(tokens, real, strict=True)]
    return GenerationResult(tokens, real, prompt_len, torch.stack(log_probs, dim=1), text)


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _eos_ids(model: Any, eos_token_id: int | Sequence[int] | None, device: Any) -> Tensor:
    """Token ids that end a row: the given ones, else the tokenizer's EOS, else none."""
    if eos_token_id is None:
        tok = model.tokenizer
        eos_token_id = [] if tok is None or tok.eos_token_id is None else tok.eos_token_id
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _default_pad(model: Any, stops: Tensor) -> int:
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(stops[0]) if stops.numel() else 0
