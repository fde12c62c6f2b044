"""HookedTransformer: the model, its forward, and the hook/cache entry points."""

from __future__ import annotations

from collections.abc import Mapping
import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mitk.cache import StreamWrites
from mitk.config import DTYPE_NAMES, TransformerConfig
from mitk.errors import UnsupportedModelError
from mitk.hooks import (
    HookPoint,
    layer_of,
)
from mitk.model import generation, processing
from mitk.model.block import TransformerBlock
from mitk.model.embed import Embed, PosEmbed, SinusoidalPosEmbed, TokenTypeEmbed, Unembed
from mitk.model.executor import holding, run_blocks
from mitk.model.forward_context import ForwardContext, PastKV
from mitk.model.hooked import HookedModule
from mitk.model.inputs import (
    check_length,
    checked_attention_mask,
    checked_residual,
    checked_tokens,
)
from mitk.model.kv_cache import KVCache
from mitk.model.loss import next_token_loss
from mitk.model.masks import AttentionMask
from mitk.model.norms import make_norm
from mitk.model.stream import decoder_stream_writes
from mitk.model.tokenization import TextInterface
from mitk.model.weights import WeightViews
from mitk.shapes import Bool, Float, Int

ReturnType = Literal["logits", "hidden", "loss"]
ModelInput = Tensor | str | list[str]


class HookedTransformer(HookedModule, WeightViews, TextInterface, nn.Module):
    """A transformer whose every activation is reachable through a named HookPoint.

    Build one from a ``TransformerConfig`` (random init) or with
    ``HookedTransformer.from_pretrained(path_or_model)``. ``hook_dict`` maps
    every hook name to its HookPoint.
    """

    def __init__(self, cfg: TransformerConfig, tokenizer: Any = None, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        # rotary and ALiBi act inside attention: nothing is added to the stream here
        if cfg.positional in ("learned", "sinusoidal"):
            self.pos_embed = (
                PosEmbed(cfg) if cfg.positional == "learned" else SinusoidalPosEmbed(cfg)
            )
            self.hook_pos_embed = HookPoint()
        if cfg.token_types:
            self.token_type_embed = TokenTypeEmbed(cfg)
            self.hook_token_type_embed = HookPoint()
        if cfg.embed_norm:
            self.ln_embed = make_norm(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        # BERT's encoder output is the last block's (post-norm) output: no final norm, no hooks
        self.ln_final = make_norm(cfg) if cfg.final_norm else nn.Identity()
        self.unembed = Unembed(cfg)
        self.tokenizer = None
        self.set_tokenizer(tokenizer)
        self._index_hooks_and_init(cfg.attention_backend, seed, cfg.dtype)

    # --- construction -----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 n_layers)."""
        gen = torch.Generator().manual_seed(seed)
        for pname, param in self.named_parameters():
            leaf = pname.rsplit(".", 1)[-1]
            if leaf in ("w",):
                param.fill_(1.0)
            elif leaf.startswith("b"):
                param.zero_()
            else:
                std = (
                    0.02 / math.sqrt(2 * self.cfg.n_layers)
                    if leaf in ("W_o_packed", "W_out")
                    else 0.02
                )
                param.copy_(torch.randn(param.shape, generator=gen) * std)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | nn.Module,
        *,
        default_padding_side: str | None = None,
        **kwargs: Any,
    ) -> HookedTransformer:
        """Load from a local Hugging Face directory, a mitk save, or an in-memory HF model.

        Weights load unprocessed, so outputs equal the original model's. A
        tokenizer found in the directory is attached; ``default_padding_side``
        sets its ``padding_side``, which text inputs are then padded on.
        """
        from mitk.model.pretrained import load_pretrained

        model: HookedTransformer = load_pretrained(cls, source, **kwargs)
        if default_padding_side is not None:
            if default_padding_side not in ("left", "right"):
                raise ValueError(
                    f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}"
                )
            model._require_tokenizer().padding_side = default_padding_side
        return model

    def _apply(self, fn: Any, recurse: bool = True) -> HookedTransformer:
        """``nn.Module``'s cast and move, then ``cfg.dtype`` set to the weights' new dtype.

        Every ``to``/``half``/``bfloat16``/``double`` passes through here, so the
        config (which ``save`` writes) never disagrees with the weights. The
        config is replaced, not mutated: another model built from it keeps its own.
        """
        super()._apply(fn, recurse)
        weights = next((p for p in self.parameters() if p.is_floating_point()), None)
        now = None if weights is None else DTYPE_NAMES.get(weights.dtype)
        if now is not None and now != self.cfg.dtype:
            processing._replace_cfg(self, dtype=now)  # blocks hold the same config object
        return self

    def save(self, directory: str | Path) -> Path:
        """Write mitk's format: ``mitk_config.json``, ``model.safetensors`` and any tokenizer."""
        from mitk.model.pretrained import save_native

        return save_native(self, Path(directory))

    def process_weights(
        self,
        *,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
    ) -> HookedTransformer:
        """Rewrite the weights in place (opt-in, per step) without changing log-probs; returns self.

        Each step keeps log-probs within 1e-4, is idempotent, matches
        TransformerLens's processing, and is recorded in
        ``cfg.extra["processing"]`` (kept by ``save``). What changes for hooks:

        - ``fold_ln``: each norm's ``w`` (and LayerNorm's ``b``) is folded into
          the layers reading it (``W_qkv``/``b_qkv``, ``W_in``/``W_gate``/``b_in``,
          ``W_U``/``b_U``; missing biases are created); the norm keeps ``w=1``,
          ``b=0``. LayerNorm readers are also centred over ``d_model``. Hook
          values are unchanged (``hook_normalized`` is already taken before
          ``w`` and ``b``), but weights and ``W_U`` now include the norm, and
          ``ln_final.b``'s share of a logit moves into ``b_U`` (DLA stays exact).
          RMSNorm: the weight only.
        - ``center_writing_weights``: ``W_E``, ``W_pos``, ``W_O``, ``b_O``,
          ``W_out``, ``b_out`` lose their mean over ``d_model``, so
          ``hook_embed``, ``hook_pos_embed``, ``hook_attn_out``, ``hook_mlp_out``,
          ``hook_resid_*`` and per-head/neuron writes become mean-free; norm
          hooks, q/k/v/z, patterns and neurons are unchanged (fixed sinusoidal
          positions are not weights and keep their mean). LayerNorm models
          only: refused (``UnsupportedModelError``) on RMSNorm, where the mean matters.
        - ``center_unembed``: ``W_U`` and ``b_U`` lose their mean over the
          vocabulary; logits shift by a per-position constant, log-probs do not.
        - ``fold_value_biases``: ``b_V`` moves through ``W_O`` into ``b_O``
          (patterns sum to 1); ``hook_v`` and ``hook_z`` lose the bias, per-head
          results lose ``b_V @ W_O`` (now in the layer's bias), ``hook_attn_out`` is
          unchanged.

        A refused step leaves the model untouched. ``from_pretrained(...,
        fold_ln=True, ...)`` applies the same steps after loading.
        """
        return processing.process_weights(
            self,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )

    # --- forward ----------------------------------------------------------------------
    def forward(
        self,
        input: ModelInput,
        attention_mask: Tensor | None = None,
        return_type: ReturnType = "logits",
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        logit_positions: int | slice | Tensor | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
        hold: Mapping[str, Tensor] | None = None,
    ) -> Float[Tensor, "..."]:
        """Run the model.

        - ``input``: token ids ``[batch, pos]`` (or ``[pos]``), text (needs a
          tokenizer; padding and mask are handled), or with ``start_at_layer``
          a residual stream ``[batch, pos, d_model]``.
        - ``attention_mask``: ``[batch, pos]``, 1 at real tokens; left or right padding.
        - ``return_type``: ``"logits"`` ``[batch, pos, d_vocab]``, ``"hidden"``
          (after the final norm) ``[batch, pos, d_model]``, or ``"loss"`` (mean
          next-token cross-entropy over real tokens; with ``start_at_layer`` pass
          ``tokens``).
        - ``stop_at_layer=L``: run blocks ``0..L-1`` and return the residual
          stream entering block L, ``[batch, pos, d_model]`` (negative L counts
          from the end).
        - ``logit_positions``: unembed only these positions (int, slice or 1-D
          index tensor); the pos axis is kept.
        - ``token_type_ids``: ``[batch, pos]`` segment ids for models with
          ``cfg.token_types`` (BERT); default all zeros.
        - ``past_kv_cache``: a ``KVCache``; the input's positions follow the
          cached ones (``attention_mask`` then covers the new positions only) and
          the cache gains them once the forward has finished.
        - ``hold``: hook name -> value that replaces that activation for this
          pass (e.g. frozen attention patterns or norm scales for a linearised
          run); a held pattern runs that layer's explicit attention path.
        - A bare encoder (``cfg.has_lm_head=False``) refuses ``"logits"`` and ``"loss"``.
        """
        cfg = self.cfg
        if isinstance(input, str) or (
            isinstance(input, list) and input and all(isinstance(t, str) for t in input)
        ):
            if attention_mask is not None:
                raise ValueError(
                    "pass either text (the mask is built for you) or an attention_mask"
                )
            input, attention_mask = self.tokenize(input)
            input, attention_mask = input.to(self.W_E.device), attention_mask.to(self.W_E.device)
        first = self._layer_index(start_at_layer, "start_at_layer", default=0)
        last = self._layer_index(stop_at_layer, "stop_at_layer", default=cfg.n_layers)
        if past_kv_cache is not None and (start_at_layer, stop_at_layer) != (None, None):
            raise ValueError("past_kv_cache needs a whole pass: no start_at_layer/stop_at_layer")
        device = self.W_E.device
        input_tokens = None
        if start_at_layer is None:
            tokens = input_tokens = checked_tokens(input, cfg).to(device)
            batch, pos = tokens.shape
        else:
            resid = checked_residual(input, cfg).to(device)
            batch, pos = resid.shape[:2]
        new_valid = checked_attention_mask(attention_mask, (batch, pos))
        new_valid = None if new_valid is None else new_valid.to(device)
        key_valid = (
            new_valid
            if past_kv_cache is None
            else past_kv_cache.key_valid_with(new_valid, batch, pos)
        )
        past = {} if past_kv_cache is None else past_kv_cache.past()
        ctx = self.forward_context(
            pos, key_valid, start=first, stop=last, past=past, held=hold,
            keep_state=past_kv_cache is not None,
        )  # fmt: skip
        with holding(self.hook_dict, ctx.held):
            if input_tokens is not None:
                resid = self._embed(input_tokens, ctx, token_type_ids)
            resid = self.run_blocks(resid, ctx)
            out = (
                resid
                if stop_at_layer is not None
                else self._read_out(resid, return_type, logit_positions, tokens, new_valid)
            )
        if past_kv_cache is not None:  # only a finished pass extends the cache
            assert ctx.present is not None
            past_kv_cache.append(ctx.present, key_valid)
        self._report_paths(ctx.paths)
        return out

    def _read_out(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        return_type: ReturnType,
        logit_positions: int | slice | Tensor | None,
        tokens: Tensor | None,
        key_valid: Tensor | None,
    ) -> Float[Tensor, "..."]:
        """The final norm, then logits, hidden states or the loss, as ``forward`` documents."""
        cfg = self.cfg
        if return_type in ("logits", "loss") and not cfg.has_lm_head:
            raise UnsupportedModelError(
                f"this {cfg.architecture} model has no LM head (a bare encoder): "
                f"use return_type='hidden'"
            )
        hidden = self.ln_final(resid)
        if return_type == "hidden":
            return hidden
        if return_type == "logits":
            if logit_positions is not None:
                index = (
                    slice(logit_positions, logit_positions + 1 or None)
                    if isinstance(logit_positions, int)
                    else logit_positions
                )
                hidden = hidden[:, index]
            return self.unembed(hidden)
        if return_type == "loss":
            if tokens is None:
                raise ValueError("return_type='loss' with start_at_layer needs tokens=")
            tokens = checked_tokens(tokens, cfg).to(hidden.device)
            return next_token_loss(hidden, tokens, key_valid, self.unembed)
        raise ValueError(f"return_type must be 'logits', 'hidden' or 'loss', got {return_type!r}")

    def forward_context(
        self,
        q_len: int,
        key_valid: Bool[Tensor, "batch key_pos"] | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
        past: Mapping[int, PastKV] | None = None,
        held: Mapping[str, Tensor] | None = None,
        keep_state: bool = False,
    ) -> ForwardContext:
        """The context of one pass of ``q_len`` new positions after any ``past`` state.

        ``key_valid`` covers past and new positions (``[batch, past + q_len]``,
        True at real tokens; None: nothing padded). ``past`` maps a layer to its
        earlier keys and values (all layers run must agree on their length);
        ``keep_state=True`` collects each layer's full state in ``ctx.present``.
        """
        past = dict(past or {})
        past_len = next(iter(past.values()))[0].shape[2] if past else 0
        check_length(past_len + q_len, self.cfg)
        mask = AttentionMask(self.cfg.causal, q_len, past_len + q_len, key_valid)
        return ForwardContext(
            mask=mask,
            backend=self.attention_backend,
            start=start,
            stop=stop,
            past=past,
            present={} if keep_state else None,
            held=dict(held or {}),
        )

    def run_blocks(
        self, resid: Float[Tensor, "batch pos d_model"], ctx: ForwardContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Blocks ``ctx.start..ctx.stop`` on ``resid``: the one loop every pass goes through.

        Hooks attached to the model fire as in ``forward``; ``ctx.held`` values
        apply only when the caller attaches them (``forward`` does, for the
        whole pass including the final norm).
        """
        return run_blocks(self.blocks, resid, ctx)

    def _embed(
        self,
        tokens: Int[Tensor, "batch pos"],
        ctx: ForwardContext,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Token (+ position, + token-type) embeddings of the pass's new positions."""
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional in ("learned", "sinusoidal"):
            # positions follow any past ones and skip padding: the mask's key slots, last q_len
            positions = ctx.mask.positions(tokens.device)[:, -tokens.shape[1] :]
            pos_embed = self.pos_embed.at(positions).to(resid.dtype)
            resid = resid + self.hook_pos_embed(_per_row(pos_embed, resid, self.hook_pos_embed))
        if self.cfg.token_types:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(tokens)
            types = self.token_type_embed(token_type_ids.to(tokens.device))
            resid = resid + self.hook_token_type_embed(
                _per_row(types, resid, self.hook_token_type_embed)
            )
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this model has no token-type embedding")
        return self.ln_embed(resid) if self.cfg.embed_norm else resid

    def _layer_index(self, layer: int | None, what: str, default: int) -> int:
        if layer is None:
            return default
        n = self.cfg.n_layers
        if not -n <= layer <= n:
            raise ValueError(f"{what}={layer} is outside [-{n}, {n}] for a {n}-layer model")
        return layer % n if layer < 0 else layer

    # the signature and docs live with the implementation (generation.py), one definition
    generate = generation.generate

    def stream_writes(self) -> StreamWrites:
        """The residual stream's writes and output weights, for the cache and DLA."""
        return decoder_stream_writes(self)

    def attention_paths(self) -> list[str]:
        """Per layer, which attention path the last forward ran (``"sdpa"`` or ``"eager: why"``).

        Read from the record the last finished ``forward`` left (layers it did not
        run say ``"not run"``); the record is a report only and never changes what
        a forward computes.
        """
        return [self._path_record.get(block.attn.name, "not run") for block in self.blocks]

    # --- hooks and caching -------------------------------------------------------------
    def hooks_that_fire(
        self, start_at_layer: int | None = None, stop_at_layer: int | None = None
    ) -> list[str]:
        """Hook names a forward with these layer bounds passes through."""
        first = self._layer_index(start_at_layer, "start_at_layer", 0)
        last = self._layer_index(stop_at_layer, "stop_at_layer", self.cfg.n_layers)
        fired = []
        for hook_name in self.hook_dict:
            layer = layer_of(hook_name)
            if layer is None:
                is_final = hook_name.startswith("ln_final.")
                ok = stop_at_layer is None if is_final else start_at_layer is None
            else:
                ok = first <= layer < last
            if ok:
                fired.append(hook_name)
        return fired


def _per_row(
    write: Float[Tensor, "#batch pos d_model"], like: Tensor, hook: HookPoint
) -> Float[Tensor, "batch pos d_model"]:
    """``write`` at the stream's shape: a broadcast view, or a real copy when a hook may edit it."""
    full = write.expand(like.shape)
    return full.clone() if hook.has_hooks else full
