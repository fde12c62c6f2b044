"""TransformerLens's model API on top of mitk's: the methods a TransformerLens notebook calls.

A mixin of ``HookedTransformer``: loading and interop spellings, ``loss_fn``,
``input_to_embed``, ``tokens_to_residual_directions``, ``accumulated_bias`` and
the global ``set_use_*`` switches. Each is a thin layer over mitk's own
mechanism (the forward's embedding, loss and stream writes), so both APIs give
the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mitk.cache import StreamWrites
from mitk.cache.decompose import accumulated_bias
from mitk.errors import InvalidTokensError, UnsupportedModelError
from mitk.model.kv_cache import KVCache
from mitk.model.loss import loss_from_logits
from mitk.shapes import Float, Int

if TYPE_CHECKING:
    from mitk.model.transformer import HookedTransformer, ModelInput


class TransformerLensAPI:
    """Mixin: TransformerLens's names for what ``HookedTransformer`` already computes."""

    if TYPE_CHECKING:  # provided by HookedTransformer and its other mixins
        tokenizer: Any

        @property
        def W_U(self) -> Tensor: ...

        @classmethod
        def from_pretrained(cls, source: Any, **kwargs: Any) -> HookedTransformer: ...

        def tokens_and_mask(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]: ...

        def _padding_side(self, padding_side: str | None) -> str: ...

        def to_single_token(self, string: str) -> int: ...

        def stream_writes(self) -> StreamWrites: ...

    @classmethod
    def from_pretrained_no_processing(
        cls, source: str | Path | nn.Module, **kwargs: Any
    ) -> HookedTransformer:
        """TransformerLens's name for a load without weight processing: ``from_pretrained`` itself.

        mitk never processes unless asked, so this is ``from_pretrained(source,
        **kwargs)``; processing flags passed here still apply.
        """
        return cls.from_pretrained(source, **kwargs)

    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "..."],  # [batch, pos]: checked below, with a message that says so
        attention_mask: Tensor | None = None,
        per_token: bool = False,
    ) -> Float[Tensor, "*loss_shape"]:
        """TransformerLens's ``loss_fn``: next-token cross-entropy of ``logits`` (fp32).

        The mean over pairs of real tokens, or with ``per_token=True``
        ``[batch, pos - 1]`` (0 at pairs touching padding). ``attention_mask``
        ``[batch, pos]`` is 1 at real tokens. The same computation as
        ``forward(..., return_type="loss")``.
        """
        return loss_from_logits(logits, tokens, attention_mask, per_token)

    def input_to_embed(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Tensor | None = None,
        past_kv_cache: KVCache | None = None,
    ) -> tuple[
        Float[Tensor, "batch pos d_model"],
        Int[Tensor, "batch pos"],
        None,
        Int[Tensor, "batch key_pos"] | None,
    ]:
        """TransformerLens's ``(residual, tokens, shortformer_pos_embed, attention_mask)``.

        ``residual`` is the stream entering block 0, computed by the same
        embedding ``forward`` runs (its embedding hooks fire), so
        ``forward(residual, start_at_layer=0, attention_mask=mask, tokens=tokens)``
        equals ``forward(input)``. ``shortformer_pos_embed`` is always None (no
        shortformer models). ``attention_mask`` (1 at real tokens) is the mask
        the forward uses: None when nothing is padding and TransformerLens would
        give none (it gives one for a left padding side, a given mask or a cache;
        unlike TransformerLens, right-padded text gets its mask too). With
        ``past_kv_cache`` it covers cached and new positions; the cache is not
        changed.
        """
        tokens, valid = self.tokens_and_mask(
            input, attention_mask, prepend_bos, padding_side, after_cache=past_kv_cache is not None
        )
        batch, pos = tokens.shape
        key_valid = (
            valid if past_kv_cache is None else past_kv_cache.key_valid_with(valid, batch, pos)
        )
        past = {} if past_kv_cache is None else past_kv_cache.past()
        model = cast("HookedTransformer", self)
        past_len = None if past_kv_cache is None else past_kv_cache.length
        ctx = model.forward_context(pos, key_valid, past=past, past_len=past_len)
        resid = model._embed(tokens, ctx)
        wants_mask = (
            attention_mask is not None
            or past_kv_cache is not None
            or (self.tokenizer is not None and self._padding_side(padding_side) == "left")
        )
        if key_valid is None and not wants_mask:
            return resid, tokens, None, None
        key_len = ctx.mask.k_len
        mask = torch.ones(batch, key_len, dtype=torch.long, device=tokens.device)
        return resid, tokens, None, mask if key_valid is None else key_valid.long()

    def tokens_to_residual_directions(
        self, tokens: str | int | list[int] | list[str] | Tensor
    ) -> Float[Tensor, "*batch d_model"]:
        """The unembedding direction (a ``W_U`` column) of each token, as TransformerLens's.

        An int, a string that is one token or a one-element tensor gives
        ``[d_model]``; a tensor of several ids ``[*shape, d_model]``; a list of
        ids or single-token strings ``[len, d_model]`` (TransformerLens refuses
        lists). Without ``fold_ln`` processing, the final norm's weight is not
        in ``W_U``, so these are not the directions the stream is read along.
        """
        if isinstance(tokens, list):
            if not tokens or not all(isinstance(t, int | str) for t in tokens):
                raise InvalidTokensError("a list of tokens must hold ids or single-token strings")
            ids = [t if isinstance(t, int) else self.to_single_token(t) for t in tokens]
            return self.W_U[:, torch.tensor(ids, device=self.W_U.device)].mT
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens.to(self.W_U.device)].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, int) and not isinstance(tokens, bool):
            token = tokens
        elif isinstance(tokens, Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        else:
            raise InvalidTokensError(f"invalid token type {type(tokens).__name__}")
        return self.W_U[:, token]

    @classmethod
    def from_transformer_lens(cls, tl_model: Any) -> HookedTransformer:
        """TransformerLens's classic ``HookedTransformer`` as a mitk model: same weights, tokenizer.

        Logits and every hook both models name agree; what TransformerLens keeps
        that mitk cannot compute the same way raises ``UnsupportedModelError``
        naming the config field (see ``mitk.model.pretrained.tl_interop``).
        """
        from mitk.model.pretrained.tl_interop import from_transformer_lens

        model: HookedTransformer = from_transformer_lens(cls, tl_model)
        return model

    def to_transformer_lens(self) -> Any:
        """This model as TransformerLens's classic ``HookedTransformer``: same weights, tokenizer.

        Needs transformer-lens installed (``TransformerLensNotInstalledError``
        otherwise); ``from_transformer_lens`` of the result gives this state back.
        """
        from mitk.model.pretrained.tl_interop import to_transformer_lens

        return to_transformer_lens(self)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the output biases written into the stream before ``layer`` (TransformerLens's).

        ``b_O`` of every layer before ``layer``, with each ``b_out`` when
        ``include_mlp_biases``; ``mlp_input=True`` adds ``layer``'s own ``b_O``
        (the bias in the MLP's input). Reads weights only. A layer outside
        ``[-n_layers, n_layers]`` raises ``LayerOutOfRangeError``.
        """
        return accumulated_bias(self.stream_writes(), layer, mlp_input, include_mlp_biases)

    # --- TransformerLens's global switches ---------------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Accepted and ignored: per-head results need no switch in mitk.

        ``blocks.L.attn.hook_result`` ``[batch, pos, head, d_model]`` is computed
        whenever a hook (or ``run_with_cache(names_filter=...)``) asks for it,
        and ``cache.stack_head_results`` derives it from ``hook_z``.
        """

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Refused: mitk has no per-head q/k/v inputs (``hook_q_input`` ...)."""
        _refuse_switch(
            "set_use_split_qkv_input",
            use_split_qkv_input,
            "hook blocks.L.ln1.hook_normalized (the input every head reads), or edit "
            "hook_q/hook_k/hook_v per head",
        )

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Refused: mitk has no per-head attention input (``hook_attn_in``)."""
        _refuse_switch(
            "set_use_attn_in",
            use_attn_in,
            "hook blocks.L.hook_resid_pre (what every head's ln1 reads)",
        )

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Refused: mitk has no ``hook_mlp_in``."""
        _refuse_switch(
            "set_use_hook_mlp_in",
            use_hook_mlp_in,
            "hook blocks.L.hook_resid_mid (the MLP's input before ln2; resid_pre when "
            "attention and MLP run in parallel)",
        )

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        """Refused: grouped keys and values stay grouped in hooks (``kv_head`` axis)."""
        _refuse_switch(
            "set_ungroup_grouped_query_attention",
            ungroup_grouped_query_attention,
            "read cache.per_query_head('blocks.L.attn.hook_k') (or hook_v) for one slice per "
            "query head",
        )


def _refuse_switch(name: str, value: bool, instead: str) -> None:
    """Turning a TransformerLens switch off is a no-op; turning it on says what to do instead."""
    if value:
        raise UnsupportedModelError(f"{name}(True) has no mitk equivalent: {instead}")
