"""HookedEncoderDecoder: a T5-style encoder-decoder whose every activation is a named hook.

Hook names (``L`` is a layer of that stack):

- ``encoder.hook_embed``, ``encoder.{L}.hook_resid_pre|hook_resid_mid|hook_resid_post``,
  ``encoder.{L}.attn.hook_q|k|v|z|attn_scores|pattern``, ``encoder.{L}.hook_attn_out|hook_mlp_out``,
  ``encoder.{L}.mlp.hook_pre|hook_post`` (``hook_pre_linear`` when gated),
  ``encoder.{L}.ln1|ln2.hook_scale|hook_normalized``, ``encoder.ln_final.*``;
- the decoder has the same under ``decoder.``, plus cross-attention:
  ``decoder.{L}.ln_cross.*``, ``decoder.{L}.cross_attn.hook_*`` (``hook_k``/``hook_v``
  over encoder positions, ``hook_pattern`` ``[batch, head, dec_pos, enc_pos]``),
  ``decoder.{L}.hook_cross_attn_out`` and ``decoder.{L}.hook_resid_mid_cross``
  (the stream after self- and cross-attention, before the MLP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from torch import Tensor, nn

from mitk.cache import StreamWrites
from mitk.errors import UnsupportedModelError
from mitk.model.embed import Embed, Unembed
from mitk.model.encoder_decoder_config import EncoderDecoderConfig
from mitk.model.hooked import HookedModule
from mitk.model.inputs import checked_attention_mask, checked_tokens
from mitk.model.loss import next_token_loss
from mitk.model.t5_stack import T5Stack
from mitk.shapes import Float, Int

ReturnType = Literal["logits", "hidden", "loss"]


class HookedEncoderDecoder(HookedModule, nn.Module):
    """A T5-style encoder-decoder with cross-attention and TransformerLens-style hooks.

    Build one from an ``EncoderDecoderConfig`` (random init) or with
    ``HookedEncoderDecoder.from_pretrained(dir_or_hf_model)`` (Hugging Face
    ``model_type="t5"``). ``embed.W_E`` is shared by both stacks; ``unembed.W_U``
    is its own copy. ``hook_dict`` maps every hook name to its HookPoint.
    Hook-name, hook-context and cache semantics are those of ``HookedTransformer``.
    """

    def __init__(
        self, cfg: EncoderDecoderConfig, tokenizer: Any = None, seed: int | None = 0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        block_cfg = self._block_cfg = cfg.block_config()  # what the shared components read
        self.embed = Embed(block_cfg)
        self.encoder = T5Stack(cfg, causal=False)
        self.decoder = T5Stack(cfg, causal=True)
        self.unembed = Unembed(block_cfg)
        self.tokenizer = tokenizer
        self._index_hooks_and_init(cfg.attention_backend, seed, cfg.dtype)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Norm weights 1, everything else N(0, 0.02) (a smoke-test init, not T5's)."""
        gen = torch.Generator().manual_seed(seed)
        for pname, param in self.named_parameters():
            if pname.endswith(".w"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)

    @classmethod
    def from_pretrained(cls, source: str | Path | nn.Module, **kwargs: Any) -> HookedEncoderDecoder:
        """Load a Hugging Face T5 checkpoint (local directory or in-memory model), unprocessed.

        ``kwargs``: ``dtype``, ``device``, ``attention_backend`` (see ``pretrained.t5``).
        """
        from mitk.model.pretrained.t5 import load_t5

        return load_t5(cls, source, **kwargs)

    # --- forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: Int[Tensor, "batch enc_pos"],
        decoder_input_ids: Int[Tensor, "batch dec_pos"],
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        return_type: ReturnType = "logits",
    ) -> Float[Tensor, "..."]:
        """Encode ``input_ids`` and decode ``decoder_input_ids`` against them.

        Masks are ``[batch, pos]``, 1 at real tokens. ``return_type``:
        ``"logits"`` ``[batch, dec_pos, d_vocab]``; ``"hidden"`` the decoder's
        final-norm output ``[batch, dec_pos, d_model]`` (before the tied
        ``d_model**-0.5`` rescale); ``"loss"`` mean next-token cross-entropy
        over ``decoder_input_ids`` (pairs of real tokens only).
        """
        if return_type not in ("logits", "hidden", "loss"):
            raise ValueError(
                f"return_type must be 'logits', 'hidden' or 'loss', got {return_type!r}"
            )
        encoder_out, enc_valid = self._encode(input_ids, attention_mask)
        dec_tokens = checked_tokens(decoder_input_ids, self._block_cfg).to(encoder_out.device)
        dec_valid = self._valid(decoder_attention_mask, dec_tokens)
        if dec_tokens.shape[0] != encoder_out.shape[0]:
            raise ValueError(
                f"decoder batch {dec_tokens.shape[0]} != encoder batch {encoder_out.shape[0]}"
            )
        ctx = self.decoder.forward_context(
            dec_tokens.shape[1], dec_valid, self.attention_backend, encoder_out, enc_valid
        )
        hidden = self.decoder(self.embed(dec_tokens), ctx)
        self._report_paths(ctx.paths, new_pass=False)
        if return_type == "hidden":
            return hidden
        if return_type == "logits":
            return self._unembed(hidden)
        return next_token_loss(hidden, dec_tokens, dec_valid, self._unembed)

    def encode(
        self, input_ids: Int[Tensor, "batch enc_pos"], attention_mask: Tensor | None = None
    ) -> Float[Tensor, "batch enc_pos d_model"]:
        """The encoder output (after its final norm), which cross-attention reads."""
        return self._encode(input_ids, attention_mask)[0]

    def _encode(
        self, input_ids: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        tokens = checked_tokens(input_ids, self._block_cfg).to(self.embed.W_E.device)
        valid = self._valid(attention_mask, tokens)
        ctx = self.encoder.forward_context(tokens.shape[1], valid, self.attention_backend)
        encoded = self.encoder(self.embed(tokens), ctx)
        self._report_paths(ctx.paths)  # a pass through the model starts with the encoder
        return encoded, valid

    def _valid(self, mask: Tensor | None, tokens: Tensor) -> Tensor | None:
        valid = checked_attention_mask(mask, (tokens.shape[0], tokens.shape[1]))
        return None if valid is None else valid.to(tokens.device)

    def _unembed(self, hidden: Tensor) -> Tensor:
        # tied T5 (v1.0) rescales the decoder output so the shared embedding works as W_U
        if self.cfg.scale_unembed_input:
            hidden = hidden * self.cfg.d_model**-0.5
        return self.unembed(hidden)

    def stream_writes(self) -> StreamWrites:
        """Refused writes: decompositions and DLA cover decoder-only models (hook names differ)."""
        why = "residual-stream decompositions cover decoder-only models, not encoder-decoders"
        return StreamWrites(
            n_layers=self.cfg.n_decoder_layers,
            n_heads=self.cfg.n_heads,
            has_mlp=True,
            layernorm=False,
            embedding_hooks=(),
            head_output=lambda layer: self._refuse(why),
            neuron_output=lambda layer: self._refuse(why),
            not_additive=why,
        )

    @staticmethod
    def _refuse(why: str) -> NoReturn:
        raise UnsupportedModelError(why)

    def attention_paths(self) -> dict[str, str]:
        """Per attention layer (``"encoder.0.attn"``...), the path the last forward ran.

        Read from the record the last pass left (``"not run"`` for layers it did
        not reach); a report only, never consulted by a forward.
        """
        paths = {}
        for stack_name, stack in (("encoder", self.encoder), ("decoder", self.decoder)):
            for path in stack.attentions():
                full = f"{stack_name}.{path}"
                paths[full] = self._path_record.get(full, "not run")
        return paths
