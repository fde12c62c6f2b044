"""Which TransformerLens parameter is which mitk tensor: one table, read in both directions.

TransformerLens's parameter names are mitk's, with two exceptions: grouped-query
models keep key/value weights as ``attn._W_K``/``_W_V``/``_b_K``/``_b_V``, and
a norm right after the embedding lives inside it (``embed.ln``, mitk's
``ln_embed``). Attention weights go through mitk's per-head views (``attn.W_Q
[head, d_model, d_head]``...), which share storage with the packed parameters,
so the head layout is defined once, in ``mitk.model.attention``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mitk.config import TransformerConfig
from mitk.errors import UnsupportedModelError

BIAS_FIELDS = {
    "b_Q": "attn_qkv_bias",
    "b_K": "attn_qkv_bias",
    "b_V": "attn_qkv_bias",
    "_b_K": "attn_qkv_bias",
    "_b_V": "attn_qkv_bias",
    "b_O": "attn_out_bias",
    "b_in": "mlp_bias",
    "b_out": "mlp_bias",
    "b_U": "unembed_bias",
}
"""TransformerLens bias leaf name -> the mitk config field that says whether mitk has it."""


def pre_norms(cfg: TransformerConfig) -> list[str]:
    """Module paths of the norms that read the stream (the ones ``fold_ln`` folds)."""
    per_layer = ("ln1", "ln2") if cfg.has_mlp else ("ln1",)
    return ["ln_final", *(f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in per_layer)]


def shared_parameters(
    cfg: TransformerConfig, *, grouped: bool, norm_weights: bool
) -> dict[str, str]:
    """TransformerLens parameter name -> mitk tensor path (a parameter or a per-head view).

    ``grouped``: TransformerLens keeps key/value heads apart (``_W_K``...), as it
    does whenever its ``n_key_value_heads`` is set. ``norm_weights``: its norms
    carry ``w`` (and ``b``), i.e. they are not ``LNPre``/``RMSPre``.
    """
    names = {"embed.W_E": "embed.W_E", "unembed.W_U": "unembed.W_U"}
    if cfg.positional == "learned":
        names["pos_embed.W_pos"] = "pos_embed.W_pos"
    if cfg.embed_norm:
        names |= {"embed.ln.w": "ln_embed.w", "embed.ln.b": "ln_embed.b"}
    if cfg.unembed_bias:
        names["unembed.b_U"] = "unembed.b_U"
    norms = pre_norms(cfg) if norm_weights else []
    if cfg.sandwich_norms:  # never folded: TransformerLens keeps their weights
        norms += [f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in ("ln1_post", "ln2_post")]
    for norm in norms:
        names[f"{norm}.w"] = f"{norm}.w"
        if cfg.normalization == "layernorm":
            names[f"{norm}.b"] = f"{norm}.b"
    kv = "_" if grouped else ""
    for layer in range(cfg.n_layers):
        attn, mlp = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        leaves = {"W_Q": "W_Q", f"{kv}W_K": "W_K", f"{kv}W_V": "W_V", "W_O": "W_O"}
        if cfg.attn_qkv_bias:
            leaves |= {"b_Q": "b_Q", f"{kv}b_K": "b_K", f"{kv}b_V": "b_V"}
        if cfg.attn_out_bias:
            leaves["b_O"] = "b_O"
        names |= {f"{attn}.{tl}": f"{attn}.{mk}" for tl, mk in leaves.items()}
        if cfg.has_mlp:
            mlp_leaves = ["W_in", "W_out"] + ["W_gate"] * cfg.gated_mlp
            mlp_leaves += ["b_in", "b_out"] if cfg.mlp_bias else []
            names |= {f"{mlp}.{leaf}": f"{mlp}.{leaf}" for leaf in mlp_leaves}
    return names


def needless(tl_name: str, cfg: TransformerConfig) -> bool:
    """A TransformerLens parameter mitk has no place for because it adds nothing.

    A bias of a group mitk lacks (zero whichever way the conversion goes), or
    the position table TransformerLens builds but never reads in rotary and
    ALiBi models.
    """
    leaf = tl_name.rsplit(".", 1)[-1]
    if leaf in BIAS_FIELDS:
        return not getattr(cfg, BIAS_FIELDS[leaf])
    return tl_name == "pos_embed.W_pos" and cfg.positional != "learned"


def tensor_at(model: nn.Module, path: str) -> Tensor:
    """The parameter or view at ``path`` (``"blocks.0.attn.W_Q"``); views write through."""
    owner, _, leaf = path.rpartition(".")
    tensor: Tensor = getattr(model.get_submodule(owner), leaf)
    return tensor


def copy_into(target: Tensor, source: Tensor, name: str) -> None:
    """``target.copy_(source)``, refusing a shape mismatch that ``copy_`` would broadcast."""
    if target.shape != source.shape:
        raise UnsupportedModelError(
            f"{name}: {tuple(source.shape)} does not fit the {tuple(target.shape)} it maps to"
        )
    target.copy_(source)
