"""HookedTransformer: the model, its forward, and the hook/cache entry points."""

from __future__ import annotations

from collections.abc import Mapping
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

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
from mitk.model.block import block_class
from mitk.model.embed import Embed, PosEmbed, SinusoidalPosEmbed, TokenTypeEmbed, Unembed
from mitk.model.executor import holding, run_blocks
from mitk.model.forward_context import ForwardContext, PastKV
from mitk.model.hooked import HookedModule
from mitk.model.inputs import (
    check_length,
    checked_attention_mask,
    checked_residual,
    checked_tokens,
    global_tokens_of,
)
from mitk.model.kv_cache import KVCache
from mitk.model.loss import loss_from_logits, next_token_loss, next_token_losses
from mitk.model.masks import AttentionMask
from mitk.model.memory import ensure_fits
from mitk.model.norms import make_norm
from mitk.model.rwkv import RWKVBlock, rwkv_norm
from mitk.model.ssm import MambaBlock
from mitk.model.stream import decoder_stream_writes
from mitk.model.tokenization import TextInterface
from mitk.model.transformer_lens_api import TransformerLensAPI
from mitk.model.weights import WeightViews
from mitk.shapes import Bool, Float, Int

ReturnType = Literal["logits", "hidden", "loss", "both"]
ModelInput = Tensor | str | list[str]


class LogitsAndLoss(NamedTuple):
    """``return_type="both"``: the logits ``[batch, pos, d_vocab]`` and the loss."""

    logits: Float[Tensor, "batch pos d_vocab"]
    loss: Float[Tensor, "*loss_shape"]


ForwardOutput = Float[Tensor, "..."] | LogitsAndLoss | None
"""What ``forward`` returns: a tensor, ``LogitsAndLoss`` for ``"both"``, None for None."""


class HookedTransformer(HookedModule, WeightViews, TextInterface, TransformerLensAPI, nn.Module):
    """A transformer whose every activation is reachable through a named HookPoint.

    Build one from a ``TransformerConfig`` (random init) or with
    ``HookedTransformer.from_pretrained(path_or_model)``. ``hook_dict`` maps
    every hook name to its HookPoint.
    """

    def __init__(self, cfg: TransformerConfig, tokenizer: Any = None, seed: int | None = 0) -> None:
        super().__init__()
        ensure_fits(cfg)  # from the config alone: a 10**9-layer config stops here, by name
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
        self.blocks = nn.ModuleList(
            block_class(cfg, layer)(cfg, layer) for layer in range(cfg.n_layers)
        )
        # BERT's encoder output is the last block's (post-norm) output: no final norm, no hooks
        self.ln_final = make_norm(cfg) if cfg.final_norm else nn.Identity()
        if cfg.rwkv is not None and cfg.final_norm:  # its own epsilon, rescaled (RWKVConfig)
            self.ln_final = rwkv_norm(cfg, cfg.n_layers, cfg.rwkv.final_norm_eps)
        self.unembed = Unembed(cfg)
        self.tokenizer = None
        self.set_tokenizer(tokenizer)
        self._index_hooks_and_init(cfg.attention_backend, seed, cfg.dtype)
        if self.cfg.device != cfg.device:  # built where torch builds, then moved as asked
            self.to(cfg.device)

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
        for block in self.blocks:  # Mamba's and RWKV's decay rates, skips, biases, mixes
            if isinstance(block, MambaBlock):
                block.mixer.init_ssm_parameters(gen)
            elif isinstance(block, RWKVBlock):
                block.init_rwkv_parameters()

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | nn.Module,
        *,
        default_padding_side: str | None = None,
        default_prepend_bos: bool | None = None,
        refactor_factored_attn_matrices: bool = False,
        **kwargs: Any,
    ) -> HookedTransformer:
        """Load from a local Hugging Face directory, a mitk save, or an in-memory HF model.

        Weights load unprocessed, so outputs equal the original model's
        (unlike TransformerLens, processing is opt-in: pass ``fold_ln=True``
        ... or call ``process_weights_()``). A tokenizer found in the directory
        is attached; ``default_padding_side`` sets its ``padding_side``, which
        text inputs are then padded on; ``default_prepend_bos`` sets
        ``cfg.default_prepend_bos``. Other keywords (``dtype``, ``device``,
        ``tokenizer``, the processing flags, ``revision``) go to the loader.
        """
        from mitk.model.pretrained import load_pretrained

        model: HookedTransformer = load_pretrained(cls, source, **kwargs)
        if default_padding_side is not None:
            model.set_tokenizer(model._require_tokenizer(), default_padding_side)
        if default_prepend_bos is not None:
            processing._replace_cfg(model, default_prepend_bos=default_prepend_bos)
        if (
            refactor_factored_attn_matrices
        ):  # after the loader's steps, as TransformerLens orders them
            model.process_weights(refactor_factored_attn_matrices=True)
        return model

    def _apply(self, fn: Any, recurse: bool = True) -> HookedTransformer:
        """``nn.Module``'s cast and move, then ``cfg.dtype`` and ``cfg.device`` set to the weights'.

        Every ``to``/``cuda``/``cpu``/``half``/``double`` passes through here, so
        the config never disagrees with the weights. The config is replaced,
        not mutated: another model built from it keeps its own.
        """
        super()._apply(fn, recurse)
        weights = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weights is None:
            return self
        changes: dict[str, str] = {}
        dtype = DTYPE_NAMES.get(weights.dtype)
        if dtype is not None and dtype != self.cfg.dtype:
            changes["dtype"] = dtype
        if str(weights.device) != self.cfg.device:
            changes["device"] = str(weights.device)
        if changes:
            processing._replace_cfg(self, **changes)  # blocks hold the same config object
        return self

    def save(self, directory: str | Path) -> Path:
        """Write mitk's format: ``mitk_config.json``, ``model.safetensors`` and any tokenizer."""
        from mitk.model.pretrained import save_native

        return save_native(self, Path(directory))

    # the signatures and docs live with the implementation (processing.py), one definition
    process_weights = processing.process_weights
    process_weights_ = processing.process_weights_

    # --- forward ----------------------------------------------------------------------
    def forward(
        self,
        input: ModelInput,
        attention_mask: Tensor | None = None,
        return_type: ReturnType | None = "logits",
        *,
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        logit_positions: int | slice | Tensor | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        shortformer_pos_embed: Tensor | None = None,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
        hold: Mapping[str, Tensor] | None = None,
        global_attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> ForwardOutput:
        """Run the model.

        - ``input``: token ids ``[batch, pos]`` (or ``[pos]``), text (needs a
          tokenizer; padding and mask are handled, tokenized with
          ``prepend_bos``/``padding_side`` as ``to_tokens``), or with
          ``start_at_layer`` a residual stream ``[batch, pos, d_model]``.
        - ``attention_mask``: ``[batch, pos]``, 1 at real tokens; left or right
          padding. Token ids without one are masked as TransformerLens does when
          the padding side (``padding_side``, else the tokenizer's) is left:
          leading pad tokens count as padding (see ``get_attention_mask``).
        - ``return_type``: ``"logits"`` ``[batch, pos, d_vocab]``, ``"hidden"``
          (after the final norm) ``[batch, pos, d_model]``, ``"loss"`` (mean
          next-token cross-entropy over real tokens, fp32; ``loss_per_token=True``
          gives ``[batch, pos - 1]``, 0 at pairs touching padding), ``"both"``
          (``LogitsAndLoss(logits, loss)``), or None (the final norm runs, then
          nothing is returned). With ``start_at_layer``, losses need ``tokens``.
        - ``stop_at_layer=L``: run blocks ``0..L-1`` and return the residual
          stream entering block L, ``[batch, pos, d_model]`` (negative L counts
          from the end).
        - ``logit_positions``: unembed only these positions (int, slice or 1-D
          index tensor); the pos axis is kept. Logits only.
        - ``shortformer_pos_embed``: TransformerLens's; mitk has no shortformer
          models, so it must be None.
        - ``token_type_ids``: ``[batch, pos]`` segment ids for models with
          ``cfg.token_types`` (BERT); default all zeros.
        - ``past_kv_cache``: a ``KVCache``; the input's positions follow the
          cached ones (``attention_mask`` then covers the new positions only) and
          the cache gains them once the forward has finished.
        - ``hold``: hook name -> value that replaces that activation for this
          pass (e.g. frozen attention patterns or norm scales for a linearised
          run); a held pattern runs that layer's explicit attention path.
        - ``global_attention_mask``: ``[batch, pos]``, 1 at tokens with global
          attention, for Longformer models (``cfg.longformer``); padded positions
          are never global.
        - A bare encoder (``cfg.has_lm_head=False``) refuses logits and losses.
        """
        cfg = self.cfg
        if shortformer_pos_embed is not None:
            raise UnsupportedModelError(
                "shortformer_pos_embed is for TransformerLens's shortformer models; mitk has "
                "none (positions are added to the stream or applied inside attention)"
            )
        first = self._layer_index(start_at_layer, "start_at_layer", default=0)
        last = self._layer_index(stop_at_layer, "stop_at_layer", default=cfg.n_layers)
        if past_kv_cache is not None and (start_at_layer, stop_at_layer) != (None, None):
            raise ValueError("past_kv_cache needs a whole pass: no start_at_layer/stop_at_layer")
        input_tokens = None
        if start_at_layer is None:
            tokens, new_valid = self.tokens_and_mask(
                input,
                attention_mask,
                prepend_bos,
                padding_side,
                after_cache=past_kv_cache is not None,
            )
            input_tokens = tokens
            batch, pos = tokens.shape
        else:
            resid = checked_residual(input, cfg).to(cfg.device)
            batch, pos = resid.shape[:2]
            new_valid = checked_attention_mask(attention_mask, (batch, pos))
            new_valid = None if new_valid is None else new_valid.to(cfg.device)
        key_valid = (
            new_valid
            if past_kv_cache is None
            else past_kv_cache.key_valid_with(new_valid, batch, pos)
        )
        past = {} if past_kv_cache is None else past_kv_cache.past()
        ctx = self.forward_context(
            pos, key_valid, start=first, stop=last, past=past, held=hold,
            keep_state=past_kv_cache is not None,
            past_len=None if past_kv_cache is None else past_kv_cache.length,
            global_tokens=global_tokens_of(global_attention_mask, cfg, (batch, pos), key_valid),
        )  # fmt: skip
        with holding(self.hook_dict, ctx.held):
            if input_tokens is not None:
                resid = self._embed(input_tokens, ctx, token_type_ids)
            resid = self.run_blocks(resid, ctx)
            out = (
                resid
                if stop_at_layer is not None
                else self._read_out(
                    resid, return_type, logit_positions, tokens, new_valid, loss_per_token
                )
            )
        if past_kv_cache is not None:  # only a finished pass extends the cache
            assert ctx.present is not None
            past_kv_cache.append(ctx.present, key_valid, length=ctx.mask.k_len)
        self._report_paths(ctx.paths)
        return out

    def _read_out(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        return_type: ReturnType | None,
        logit_positions: int | slice | Tensor | None,
        tokens: Tensor | None,
        key_valid: Tensor | None,
        loss_per_token: bool = False,
    ) -> ForwardOutput:
        """The final norm, then logits, hidden states, losses or nothing, as ``forward`` documents.

        Losses unembed in chunks (``loss.py``) unless ``"both"`` needs the
        logits anyway or an unembed hook must see them all at once.
        """
        cfg = self.cfg
        if return_type not in (None, "logits", "hidden", "loss", "both"):
            raise ValueError(
                "return_type must be 'logits', 'hidden', 'loss', 'both' or None, "
                f"got {return_type!r}"
            )
        if return_type not in (None, "hidden") and not cfg.has_lm_head:
            raise UnsupportedModelError(
                f"this {cfg.architecture} model has no LM head (a bare encoder): "
                f"use return_type='hidden'"
            )
        if logit_positions is not None and return_type != "logits":
            raise ValueError("logit_positions selects logits: use it with return_type='logits'")
        hidden = self.ln_final(resid)
        if return_type is None:
            return None
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
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens=")
        tokens = checked_tokens(tokens, cfg).to(hidden.device)
        if return_type == "both" or self.unembed.hooked:
            logits = self.unembed(hidden)
            loss = loss_from_logits(logits, tokens, key_valid, per_token=loss_per_token)
            return LogitsAndLoss(logits, loss) if return_type == "both" else loss
        pick = next_token_losses if loss_per_token else next_token_loss
        return pick(hidden, tokens, key_valid, self.unembed)

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
        past_len: int | None = None,
        global_tokens: Bool[Tensor, "batch pos"] | None = None,
    ) -> ForwardContext:
        """The context of one pass of ``q_len`` new positions after any ``past`` state.

        ``key_valid`` covers past and new positions (``[batch, past + q_len]``,
        True at real tokens; None: nothing padded). ``past`` maps a layer to its
        earlier keys and values (all layers run must agree on their length);
        ``keep_state=True`` collects each layer's full state in ``ctx.present``.
        ``past_len`` counts the past positions (None: read from the keys in ``past``;
        a state-space layer's state does not say how many positions it has seen).
        ``global_tokens`` marks Longformer's global tokens (see ``global_tokens_of``).
        """
        past = dict(past or {})
        if past_len is None:
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
            global_tokens=global_tokens,
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
            if self.cfg.slot_positions:  # Hugging Face's arange, padding counted
                k_len = ctx.mask.k_len
                positions = torch.arange(k_len - tokens.shape[1], k_len, device=tokens.device)[None]
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
        return [
            self._path_record.get(
                (block.mixer if isinstance(block, MambaBlock | RWKVBlock) else block.attn).name,
                "not run",
            )
            for block in self.blocks
        ]

    # --- hooks and caching -------------------------------------------------------------
    def hooks_that_fire(
        self,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
    ) -> list[str]:
        """Hook names a forward with these layer bounds and ``return_type`` passes through.

        Embedding hooks need the pass to start at the embedding, ``ln_final``
        hooks to reach the end, and ``unembed`` hooks also to unembed (not
        ``"hidden"`` or None).
        """
        first = self._layer_index(start_at_layer, "start_at_layer", 0)
        last = self._layer_index(stop_at_layer, "stop_at_layer", self.cfg.n_layers)
        unembeds = stop_at_layer is None and return_type not in (None, "hidden")
        fired = []
        for hook_name in self.hook_dict:
            layer = layer_of(hook_name)
            if layer is not None:
                ok = first <= layer < last
            elif hook_name.startswith("unembed."):
                ok = unembeds
            elif hook_name.startswith("ln_final."):
                ok = stop_at_layer is None
            else:
                ok = start_at_layer is None
            if ok:
                fired.append(hook_name)
        return fired


def _per_row(
    write: Float[Tensor, "#batch pos d_model"], like: Tensor, hook: HookPoint
) -> Float[Tensor, "batch pos d_model"]:
    """``write`` at the stream's shape: a broadcast view, or a real copy when a hook may edit it."""
    full = write.expand(like.shape)
    return full.clone() if hook.has_hooks else full
