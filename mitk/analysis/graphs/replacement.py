"""The local replacement model of one prompt: transcoders in place of MLPs, the rest frozen.

Each MLP output becomes its transcoder's reconstruction plus an error term
(the true output minus the reconstruction on this prompt), and every attention
pattern and norm scale is held at its value on the prompt (the executor's
``hold``). With the feature activations fixed as well, what is left between
the token embeddings, the features and the logits is affine: ``frozen_forward``
runs that affine model for any embeddings and MLP writes, which is what graph
edges are derivatives of and what ablations under the frozen model run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mitk.analysis.graphs.transcoders import OUTPUT_HOOK, Dictionaries, TranscoderSet, dictionaries
from mitk.errors import InvalidTokensError
from mitk.hooks import HookPoint
from mitk.model import HookedTransformer
from mitk.model.inputs import checked_tokens
from mitk.shapes import Float, Int

HookFn = Callable[[Tensor, HookPoint], Tensor | None]


@dataclass(frozen=True)
class PromptState:
    """What the replacement model holds fixed for one prompt (one sequence, no batch axis).

    ``activations[L]`` are layer L's feature activations ``[pos, d_sae]``
    (position 0 zeroed unless ``first_position_features``); ``errors[L]`` is
    ``mlp_out - (reconstruction + skip(input))``, the reconstruction of layer L
    from the latents of every layer writing it, so the replacement model
    computes exactly what the model did. ``held`` maps every pattern and norm
    scale hook to its value; ``embed`` is the ``hook_embed`` write, ``hidden``
    the final norm's output and ``logits`` those of the last position.
    ``writes[L]`` is what layer L's MLP wrote less its skip term (``decode + error``),
    ``inputs[L]`` what its transcoder read.
    """

    tokens: Int[Tensor, " pos"]
    held: dict[str, Tensor]
    embed: Float[Tensor, "pos d_model"]
    activations: tuple[Tensor, ...]
    inputs: Float[Tensor, "n_layers pos d_model"]
    errors: Float[Tensor, "n_layers pos d_model"]
    writes: Float[Tensor, "n_layers pos d_model"]
    hidden: Float[Tensor, "pos d_model"]
    logits: Float[Tensor, " d_vocab"]
    first_position_features: bool


@dataclass(frozen=True)
class FrozenRun:
    """What ``frozen_forward`` returns: each transcoder's input ``[pos, d_model]``, ``hidden``."""

    inputs: list[Tensor]
    hidden: Float[Tensor, "pos d_model"]


def prompt_tokens(model: HookedTransformer, tokens: Tensor) -> Int[Tensor, " pos"]:
    """One prompt's token ids ``[pos]`` (``[1, pos]`` accepted), checked against the model."""
    checked = checked_tokens(tokens, model.cfg)
    if checked.shape[0] != 1:
        raise InvalidTokensError(
            f"an attribution graph is of one prompt; tokens have batch {checked.shape[0]}"
        )
    return checked[0].to(model.cfg.device)


@torch.no_grad()
def prompt_state(
    model: HookedTransformer,
    transcoders: TranscoderSet,
    tokens: Int[Tensor, "..."],
    *,
    first_position_features: bool = False,
) -> PromptState:
    """Run the model once on ``tokens`` and keep what the replacement model holds fixed.

    ``first_position_features=False`` (circuit-tracer's rule) leaves position 0
    without features: its MLP outputs are then all error term.
    """
    layers = dictionaries(model, transcoders)
    ids = prompt_tokens(model, tokens)
    fired = model.hooks_that_fire(return_type="hidden")
    held_names = [n for n in fired if n.endswith((".hook_pattern", "hook_scale"))]
    reads = [layers.input_hook(layer) for layer in range(layers.n_layers)]
    outs = [f"blocks.{layer}.{OUTPUT_HOOK}" for layer in range(layers.n_layers)]
    hidden, cache = model.run_with_cache(
        ids[None], attention_mask=torch.ones_like(ids[None]), return_type="hidden",
        names_filter=[*held_names, *reads, *outs, "hook_embed"],
    )  # fmt: skip
    activations: list[Tensor] = []
    errors, writes, inputs = [], [], []
    for layer, (read, out) in enumerate(zip(reads, outs, strict=True)):
        x = cache[read][0]
        acts = layers.encode(layer, x)
        if not first_position_features:
            acts[0] = 0
        activations.append(acts)
        skip = layers.skip(layer, x)
        reconstruction = layers.decode(layer, activations) + skip
        inputs.append(x)
        errors.append(cache[out][0] - reconstruction)
        writes.append(cache[out][0] - skip)
    logits = model.unembed(hidden[:, -1:])[0, 0]
    return PromptState(
        tokens=ids,
        held={name: cache[name] for name in held_names},
        embed=cache["hook_embed"][0],
        activations=tuple(activations),
        inputs=torch.stack(inputs),
        errors=torch.stack(errors),
        writes=torch.stack(writes),
        hidden=hidden[0],
        logits=logits,
        first_position_features=first_position_features,
    )


def frozen_forward(
    model: HookedTransformer,
    transcoders: TranscoderSet,
    state: PromptState,
    embed: Float[Tensor, "pos d_model"],
    writes: Float[Tensor, "n_layers pos d_model"],
) -> FrozenRun:
    """The affine model: ``embed`` at ``hook_embed``, ``writes[L] + skip(input)`` as MLP outputs.

    Patterns and norm scales are ``state``'s; positional embeddings and every
    bias are as in the model. Differentiable in ``embed`` and ``writes``.
    """
    layers = dictionaries(model, transcoders)

    def put_embed(x: Tensor, hook: HookPoint) -> Tensor:
        return embed[None].to(x.dtype)

    def write(layer: int, inputs: dict[int, Tensor]) -> HookFn:
        def replace(x: Tensor, hook: HookPoint) -> Tensor:
            return (writes[layer] + layers.skip(layer, inputs[layer]))[None].to(x.dtype)

        return replace

    return _run(model, layers, state, [("hook_embed", put_embed)], write)


@torch.no_grad()
def replacement_logits(
    model: HookedTransformer,
    transcoders: TranscoderSet,
    tokens: Int[Tensor, "..."],
    *,
    first_position_features: bool = False,
) -> Float[Tensor, "pos d_vocab"]:
    """Logits of the replacement model: live transcoders + error terms, frozen attention and norms.

    Equal to the model's own logits on ``tokens`` (the error terms make it so).
    """
    layers = dictionaries(model, transcoders)
    state = prompt_state(model, layers, tokens, first_position_features=first_position_features)
    live: list[Tensor] = []  # each layer's latents, encoded as the run reaches its input

    def write(layer: int, inputs: dict[int, Tensor]) -> HookFn:
        def replace(x: Tensor, hook: HookPoint) -> Tensor:
            x_in = inputs[layer]
            acts = layers.encode(layer, x_in)
            if not first_position_features:
                acts[0] = 0
            live.append(acts)
            out = layers.decode(layer, live) + layers.skip(layer, x_in) + state.errors[layer]
            return out[None].to(x.dtype)

        return replace

    run = _run(model, layers, state, [], write)
    return model.unembed(run.hidden[None])[0]


def _run(
    model: HookedTransformer,
    layers: Dictionaries,
    state: PromptState,
    extra: list[tuple[str, HookFn]],
    write: Callable[[int, dict[int, Tensor]], HookFn],
) -> FrozenRun:
    """Run under ``state`` with each transcoder's input kept and ``write(layer, inputs)``
    replacing each MLP output (it runs after that layer's input is kept)."""
    inputs: dict[int, Tensor] = {}

    def read(layer: int) -> HookFn:
        def keep(x: Tensor, hook: HookPoint) -> None:
            inputs[layer] = x[0]

        return keep

    hooks = list(extra)
    for layer in range(layers.n_layers):
        hooks.append((layers.input_hook(layer), read(layer)))
        hooks.append((f"blocks.{layer}.{OUTPUT_HOOK}", write(layer, inputs)))
    ids = state.tokens[None]
    with model.hooks(hooks):
        hidden = model(ids, torch.ones_like(ids), return_type="hidden", hold=state.held)
    return FrozenRun([inputs[layer] for layer in range(layers.n_layers)], hidden[0])
