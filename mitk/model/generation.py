"""Autoregressive generation with TransformerLens's arguments: greedy or sampled, batched, cached.

The prompt runs once; each later step feeds only the newest token and attends
to the keys and values the earlier steps left in a ``KVCache``. Positions (learned,
sinusoidal, rotary, ALiBi) are counted over real tokens, as in a padded forward,
so a left-padded row generates what it would generate alone.

Hooks: generation runs inside whatever ``model.hooks(...)`` context is active (or
``fwd_hooks=``). With the cache, hooks fire once on the prompt (``pos`` = prompt
length) and then once per new token with ``pos = 1`` (the new position only;
``key_pos`` in patterns grows). A hook that needs whole-sequence activations at
every step should pass ``use_past_kv_cache=False``: each step then reruns the full
sequence (slower, same tokens). A LongRoPE model (``RotaryScaling.recompute_at_switch``)
reruns the full sequence once, at the step that first passes its original context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import operator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mitk.errors import MitkError, UnsupportedModelError
from mitk.hooks import HookSpec
from mitk.model.attention import Attention
from mitk.model.inputs import check_length
from mitk.model.kv_cache import KVCache
from mitk.model.rotary import cache_outlives_short_factors
from mitk.model.rwkv import RWKVBlock
from mitk.model.ssm import MambaBlock
from mitk.shapes import Bool, Float, Int

RETURN_TYPES = ("input", "str", "tokens", "embeds", "result")


class GenerationArgumentError(MitkError, ValueError):
    """An argument of ``generate`` has the wrong type, is out of range, or contradicts another."""


@dataclass
class GenerationResult:
    """What ``generate(..., return_type="result")`` returns; ``tokens`` holds prompt and new tokens.

    ``attention_mask`` is 1 at real tokens: 0 at prompt padding and at the
    filler written after a row's EOS. ``log_probs`` is each new token's
    log-probability under the model itself (before temperature, penalty or
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
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    freq_penalty: float = 0.0,
    token_counts: Float[Tensor, "batch d_vocab"] | None = None,
) -> Int[Tensor, " batch"]:
    """One token per row, as TransformerLens's ``sample_logits``; argmax at ``temperature == 0``.

    In TransformerLens's order: logits divided by ``temperature``; minus
    ``freq_penalty`` times each token's count so far (``token_counts``); then
    top-k (clamped to the vocabulary) or, only when ``top_k`` is None, top-p (the
    most likely tokens up to and including the one whose mass first exceeds
    ``top_p``; the most likely always survives). Drawn from ``generator``, or
    torch's global generator when None (the same draw TransformerLens makes).
    Temperatures below fp32's smallest normal number are greedy too: dividing by
    them gives NaNs (in TransformerLens as well).
    """
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or too small to divide by in fp32
        return logits.argmax(-1)
    # shifted so the best score is 0: a tiny temperature then gives -inf, never inf - inf
    scores = logits.float()
    scores = (scores - scores.max(-1, keepdim=True).values) / temperature
    if freq_penalty > 0 and token_counts is not None:
        scores = scores - freq_penalty * token_counts
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    elif top_p is not None:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        mass = sorted_scores.softmax(-1).cumsum(-1)
        mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
        drop = torch.zeros_like(mass, dtype=torch.bool).scatter(-1, order, mass_before > top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.distributions.Categorical(logits=scores).probs
    return torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]


def generate(
    model: Any,  # a HookedTransformer
    input: Tensor | str | list[str] = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    return_type: str = "input",
    verbose: bool = True,
    *,
    attention_mask: Tensor | None = None,
    seed: int | None = None,
    pad_token_id: int | None = None,
    fwd_hooks: Sequence[HookSpec] = (),
) -> str | list[str] | Tensor | GenerationResult:
    """Extend each prompt by up to ``max_new_tokens`` tokens, with TransformerLens's arguments.

    - ``input``: a string, a list of strings (left-padded, whatever
      ``padding_side`` says, so every row ends on a real token), or token ids
      ``[batch, pos]`` / ``[pos]``. ``prepend_bos`` / ``padding_side`` apply to
      text (None: ``cfg.default_prepend_bos``, the tokenizer's side).
    - ``stop_at_eos``: a row ends at its first token in ``eos_token_id`` (an id
      or a list; None: the tokenizer's EOS, an error if there is none); later
      positions get filler (``eos_token_id``, or with a list the tokenizer's EOS,
      else its first id, as TransformerLens pads; ``pad_token_id`` overrides),
      and generation stops once every row has ended.
    - ``do_sample=False`` (or ``temperature=0``) is greedy; otherwise as
      TransformerLens's ``sample_logits`` (see ``sample``): ``temperature``,
      ``freq_penalty`` (>= 0; counts each row's real tokens so far, prompt
      padding excluded), then ``top_k``, or ``top_p`` when ``top_k`` is None.
      Draws use torch's global generator, or a private one seeded with ``seed``.
    - ``return_type``: ``"input"`` (text for text, tokens for tokens), ``"str"``
      (decoded without special tokens; one row gives a ``str``, more a list),
      ``"tokens"`` ``[batch, prompt + new]``, ``"embeds"`` (their token embeddings,
      ``[batch, prompt + new, d_model]``) or ``"result"``, a ``GenerationResult``
      with the mask, per-token log-probs and each row's text.
    - ``verbose``: a progress bar over the steps. ``use_past_kv_cache=False``
      reruns the whole sequence each step (for hooks that need all of it).
    - mitk's extras: ``attention_mask`` for token input (left padding only; without
      one, token ids are read as ``forward`` reads them: on a left padding side leading
      pad ids are padding), ``seed``, ``pad_token_id``, ``fwd_hooks``.

    Unlike TransformerLens: no input embeddings; Hugging Face keywords such as
    ``output_logits`` are refused, not warned about (``"result"`` has log-probs);
    a negative ``freq_penalty`` is refused, not ignored. Bad arguments raise
    ``GenerationArgumentError`` (a ``ValueError``) naming the argument.
    """
    _check_arguments(
        max_new_tokens, temperature, top_k, top_p, freq_penalty, return_type, padding_side, seed
    )
    tokens, key_valid, from_text = _prompt(model, input, attention_mask, prepend_bos, padding_side)
    wanted = ("str" if from_text else "tokens") if return_type == "input" else return_type
    if wanted == "str":
        model._require_tokenizer()  # fail before generating, not after
    check_length(tokens.shape[1] + max_new_tokens, model.cfg)  # learned positions run out
    # Mamba and RWKV blocks carry their recurrent state in the cache in place of keys and values
    carries = lambda b: isinstance(b, MambaBlock | RWKVBlock) or isinstance(b.attn, Attention)  # noqa: E731
    if use_past_kv_cache and not all(carries(b) for b in model.blocks):
        raise UnsupportedModelError(
            "this model's attention has no key-value cache support; pass use_past_kv_cache=False"
        )
    device = tokens.device
    stops, filler = _stopping(model, stop_at_eos, eos_token_id, pad_token_id)
    stops = stops.to(device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    batch, prompt_len = tokens.shape
    real = torch.ones_like(tokens) if key_valid is None else key_valid.long()
    # always explicit: a forward would otherwise read generated pad/EOS ids as padding
    key_valid = real.bool()
    counts = None
    if do_sample and freq_penalty > 0:
        counts = torch.zeros(batch, model.cfg.d_vocab, device=device)
        counts.scatter_add_(1, tokens, real.float())
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    log_probs: list[Tensor] = []
    cache = KVCache(model.cfg.n_layers, batch)
    with torch.no_grad(), model.hooks(fwd_hooks):
        for _ in tqdm(range(max_new_tokens), disable=not verbose):
            if use_past_kv_cache:
                if cache_outlives_short_factors(model.cfg.rotary_scaling, cache.length,
                                                tokens.shape[1]):  # fmt: skip
                    cache = KVCache(model.cfg.n_layers, batch)  # LongRoPE: rerun, long factors
                fresh = tokens if cache.length == 0 else tokens[:, -1:]
                logits = step(model, fresh, key_valid, cache)
            else:
                logits = model(tokens, attention_mask=key_valid, logit_positions=-1)[:, -1]
            if do_sample:
                chosen = sample(logits, temperature, top_k, top_p, generator,
                                freq_penalty=freq_penalty, token_counts=counts)  # fmt: skip
            else:
                chosen = logits.argmax(-1)
            # finished rows get filler; their mask stays 1 so every row's keys look alike
            chosen = torch.where(done, torch.full_like(chosen, filler), chosen)
            picked = logits.float().log_softmax(-1).gather(-1, chosen[:, None])[:, 0]
            log_probs.append(picked.masked_fill(done, 0.0))
            real = torch.cat([real, (~done).long()[:, None]], dim=1)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            key_valid = torch.cat([key_valid, key_valid.new_ones(batch, 1)], dim=1)
            if counts is not None:
                counts.scatter_add_(1, chosen[:, None], (~done).float()[:, None])
            done = done | torch.isin(chosen, stops)
            if bool(done.all()):
                break
        text = None
        if model.tokenizer is not None:
            rows = zip(tokens, real, strict=True)
            text = [model.to_string(row[keep.bool()]) for row, keep in rows]
        result = GenerationResult(tokens, real, prompt_len, torch.stack(log_probs, dim=1), text)
        return _as_requested(model, result, wanted)


def _check_arguments(
    max_new_tokens: object,
    temperature: object,
    top_k: object,
    top_p: object,
    freq_penalty: object,
    return_type: object,
    padding_side: object,
    seed: object,
) -> None:
    """Refuse what TransformerLens would assert on, or silently ignore, with a clear message."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:  # type: ignore[operator]
        raise GenerationArgumentError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not _is_real(temperature) or not temperature >= 0:  # type: ignore[operator]
        raise GenerationArgumentError(
            f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}"
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 1):  # type: ignore[operator]
        raise GenerationArgumentError(
            f"top_k must be an int >= 1 (or None for no limit), got {top_k!r}"
        )
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):  # type: ignore[operator]
        raise GenerationArgumentError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if not _is_real(freq_penalty) or not freq_penalty >= 0:  # type: ignore[operator]
        raise GenerationArgumentError(
            f"freq_penalty must be a number >= 0 (TransformerLens ignores negative ones), "
            f"got {freq_penalty!r}"
        )
    if return_type not in RETURN_TYPES:
        raise GenerationArgumentError(
            f"return_type must be one of {', '.join(map(repr, RETURN_TYPES))}, got {return_type!r}"
        )
    if padding_side not in (None, "left", "right"):
        raise GenerationArgumentError(
            f"padding_side must be 'left', 'right' or None, got {padding_side!r}"
        )
    if seed is not None and not _is_int(seed):
        raise GenerationArgumentError(f"seed must be an int or None, got {seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _prompt(
    model: Any,
    input: object,
    attention_mask: Tensor | None,
    prepend_bos: bool | None,
    padding_side: str | None,
) -> tuple[Tensor, Tensor | None, bool]:
    """Token ids on the model's device, the real-token mask (None: no padding), and if text came.

    ``model.tokens_and_mask`` reads the input as a forward does (so left-padded token
    ids without a mask are read as TransformerLens reads them), except that a batch of
    text is always padded on the left.
    """
    from_text = isinstance(input, str | list)
    if from_text:
        if attention_mask is not None:
            raise GenerationArgumentError(
                "pass either text (the mask is built for you) or tokens with an attention_mask"
            )
        if isinstance(input, list) and not (input and all(isinstance(t, str) for t in input)):
            raise GenerationArgumentError("a list input must be a non-empty list of strings")
        # every row must end on a real token for its next-token logits to be read there
        if isinstance(input, list) and len(input) > 1:
            padding_side = "left"
    elif isinstance(input, Tensor) and input.is_floating_point():
        raise GenerationArgumentError(
            "generate takes text or token ids; it does not start from input embeddings"
        )
    tokens, key_valid = model.tokens_and_mask(input, attention_mask, prepend_bos, padding_side)
    if key_valid is not None and not bool(key_valid[:, -1].all()):
        raise GenerationArgumentError(
            "generate needs left padding: every row's last token must be real"
        )
    return tokens, key_valid, from_text


def _stopping(
    model: Any, stop_at_eos: bool, eos_token_id: object, pad_token_id: object
) -> tuple[Int[Tensor, " n_stop"], int]:
    """Token ids that end a row, and the filler written after a row has ended."""
    tok = model.tokenizer
    tok_eos = None if tok is None else tok.eos_token_id
    ids: list[int] = []
    filler = 0
    if stop_at_eos:
        if eos_token_id is None:
            if tok_eos is None:
                raise GenerationArgumentError(
                    "stop_at_eos=True needs an eos_token_id, and this model's tokenizer has none: "
                    "pass eos_token_id=..., or stop_at_eos=False"
                )
            eos_token_id = tok_eos
        if isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str):
            ids = [_token_id(model, e, "eos_token_id") for e in eos_token_id]
            filler = tok_eos if tok_eos is not None else (ids[0] if ids else 0)
        else:
            ids = [_token_id(model, eos_token_id, "eos_token_id")]
            filler = ids[0]
    if pad_token_id is not None:
        filler = _token_id(model, pad_token_id, "pad_token_id")
    return torch.tensor(ids, dtype=torch.long), filler


def _token_id(model: Any, value: object, what: str) -> int:
    """``value`` as a token id of this model's vocabulary, or a clear error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise GenerationArgumentError(f"{what} must hold token ids (ints), got {value!r}") from None
    if not 0 <= index < model.cfg.d_vocab:
        raise GenerationArgumentError(
            f"{what} {index} is outside the vocabulary [0, {model.cfg.d_vocab})"
        )
    return index


def _as_requested(
    model: Any, result: GenerationResult, return_type: str
) -> str | list[str] | Tensor | GenerationResult:
    """The output in the form ``return_type`` names (``"input"`` already resolved)."""
    if return_type == "result":
        return result
    if return_type == "tokens":
        return result.tokens
    if return_type == "embeds":
        embeds: Tensor = model.embed(result.tokens)
        return embeds
    tok = model._require_tokenizer()
    texts = [tok.decode(row.tolist(), skip_special_tokens=True) for row in result.tokens]
    return texts[0] if len(texts) == 1 else texts
