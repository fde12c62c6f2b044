"""``mitk graph``: the attribution graph of one prompt, as the offline viewer or the frontend JSON.

``--transcoders`` is one of:

- a folder of mitk transcoders, one subfolder per layer named ``layer_0``,
  ``layer_1``, ...: each a saved ``SparseAutoencoder`` (``save_sae`` /
  ``sae.save``, so SAELens's transcoder folders work too) that reads
  ``blocks.L.ln2.hook_normalized`` (or ``blocks.L.hook_resid_mid``) and writes
  ``blocks.L.hook_mlp_out``; other entries in the folder are ignored;
- a circuit-tracer transcoder set: its ``config.yaml``, or a folder holding one
  (``mitk.sae.transcoder_sets.load_transcoder_set``);
- a cross-layer transcoder folder, mitk's or circuit-tracer's
  (``W_enc_0.safetensors``, ...; ``mitk.sae.load_clt``).

Transcoders are converted to the model's dtype, so that the graph's error
terms stay exact. ``--out`` ending in ``.html`` writes the viewer
(``mitk.viz.graph_viewer``, each feature with its top logit effects and, with
``--examples FILE``, its top-activating contexts in those tokens);
``.json`` writes circuit-tracer's frontend JSON, which its viewer and
Neuronpedia's open.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
import re
from typing import Annotated, Any, cast, overload

import torch
from torch import Tensor
import typer

from mitk.analysis.graphs import (
    AttributionGraph,
    attribution_graph,
    dictionaries,
    graph_scores,
    prune_graph,
    write_frontend_json,
)
from mitk.cli.common import DeviceOption, DtypeOption, JsonOption, ModelOption, QuietOption, emit
from mitk.cli.inputs import (
    InductionOption,
    PromptOption,
    SeedOption,
    TokensOption,
    read_prompts,
    read_token_matrix,
)
from mitk.cli.outputs import check_output_file
from mitk.config import TORCH_DTYPES
from mitk.errors import ConfigError
from mitk.model import HookedTransformer
from mitk.sae import CrossLayerTranscoder, SparseAutoencoder, latent_statistics, load_clt, load_sae
from mitk.sae.config import SAEDType
from mitk.sae.crosslayer_files import is_clt_folder
from mitk.sae.crosslayer_view import layer_transcoder
from mitk.sae.transcoder_sets import CONFIG_NAME, load_transcoder_set
from mitk.sweeps import load_named_model
from mitk.viz.attribution_graph import graph_viewer

LAYER_FOLDER = re.compile(r"^layer_(\d+)$")
VIEWER_SUFFIXES = (".html", ".htm")
LOGIT_EFFECTS = 5  # tokens each way a clicked feature lists
EXAMPLES = 5  # top-activating contexts a clicked feature lists
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 2  # tokens around each example's peak


def graph(
    model: ModelOption,
    transcoders: Annotated[
        Path,
        typer.Option(
            "--transcoders",
            "-t",
            help="Folder of per-layer transcoders (layer_0/, layer_1/, ... each a saved SAE), "
            "a circuit-tracer set's config.yaml (or its folder), or a cross-layer "
            "transcoder's folder (mitk's or circuit-tracer's).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="graph.html: the offline viewer; graph.json: circuit-tracer's JSON."),
    ],
    prompt: PromptOption = None,
    tokens: TokensOption = None,
    induction: InductionOption = None,
    seed: SeedOption = 0,
    node_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of node influence pruning keeps.")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of edge influence pruning keeps.")
    ] = 0.98,
    max_feature_nodes: Annotated[
        int | None,
        typer.Option(min=1, help="Keep only this many features, the most influential."),
    ] = None,
    max_logits: Annotated[
        int, typer.Option(min=1, help="Most logit nodes (likeliest next tokens).")
    ] = 10,
    logit_probability: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Logit nodes until their probabilities sum to this."),
    ] = 0.95,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Targets per backward pass (memory, not results).")
    ] = 256,
    examples: Annotated[
        Path | None,
        typer.Option(
            "--examples",
            help="Token file (JSONL of equal-length id lists, or .safetensors 'tokens') whose "
            "top-activating contexts the viewer shows for each feature.",
        ),
    ] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Trace the attribution graph of one prompt through per-layer transcoders.

    Nodes are active features, error terms, token embeddings and the likeliest
    next tokens; edges direct effects through the replacement model with
    attention and norms frozen (circuit-tracer's definitions). The graph is
    pruned with --node-threshold and --edge-threshold before it is written.
    """
    check_output_file(out, "--out")
    suffix = out.suffix.lower()
    if suffix not in (*VIEWER_SUFFIXES, ".json"):
        raise ConfigError(f"--out {out}: give a .html file (the viewer) or a .json file "
                          "(circuit-tracer's frontend JSON)")  # fmt: skip
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {sorted(TORCH_DTYPES)}")
    if examples is not None and not examples.is_file():
        raise FileNotFoundError(f"--examples {examples}: token file does not exist")
    layers = read_transcoders(transcoders, device, dtype)  # files first: bad ones fail fast
    net = load_named_model(model, device, dtype)
    prompts = read_prompts(net, prompt=prompt, tokens_file=tokens, induction=induction,
                           n_prompts=1, seed=seed)  # fmt: skip
    if prompts.tokens.shape[0] != 1:
        raise ConfigError(f"a graph is of one prompt; got {prompts.tokens.shape[0]} "
                          f"({prompts.source})")  # fmt: skip
    ids = prompts.tokens[0].to(net.W_E.device)
    found = attribution_graph(
        net, layers, ids, max_logits=max_logits,
        logit_probability=logit_probability, max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
    )  # fmt: skip
    texts = _token_strings(net, ids)
    vocab = _Vocabulary(net)
    scores = graph_scores(found)
    pruned = prune_graph(found, node_threshold, edge_threshold)
    options: dict[str, Any] = {
        "token_strings": texts, "vocab_strings": vocab,
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
    }  # fmt: skip
    if suffix == ".json":
        write_frontend_json(found, out, slug=out.stem, scan=transcoders.name,
                            prompt="".join(texts), **options)  # fmt: skip
    else:
        header = {
            "prompt": prompt[0] if prompt else "".join(texts),  # the text, not its tokens joined
            "model": model,
            "transcoders": str(transcoders),
            "replacement score": f"{scores.replacement:.4f}",
            "completeness score": f"{scores.completeness:.4f}",
        }
        keys = shown_features(found, pruned.node_mask)
        effects = feature_logit_effects(net, layers, keys, vocab)
        contexts = None
        if examples is not None:
            corpus = read_token_matrix(net, tokens_file=examples, induction=None)
            if isinstance(corpus, Path):
                raise ConfigError(f"--examples {examples}: give a token file, not a folder")
            contexts = feature_examples(net, layers, keys, corpus, vocab)
            header["examples from"] = f"{examples} ({corpus.shape[0]} x {corpus.shape[1]} tokens)"
        graph_viewer(out, found, logit_effects=effects, examples=contexts, header=header,
                     **options)  # fmt: skip
    nodes = found.nodes
    logits = [{"token": vocab[t], "probability": p} for t, p in zip(
        nodes.logit_tokens.tolist(), nodes.logit_probabilities.tolist(), strict=True)]  # fmt: skip
    result: dict[str, Any] = {
        "model": model,
        "transcoders": str(transcoders),
        "prompt": texts,
        "n_features": nodes.n_features,
        "n_nodes": nodes.n_nodes,
        "kept_nodes": pruned.kept_nodes,
        "kept_edges": pruned.kept_edges,
        "replacement_score": scores.replacement,
        "completeness_score": scores.completeness,
        "logits": logits,
        "format": "frontend-json" if suffix == ".json" else "html",
        "out": str(out),
    }
    lines = [
        f"attribution graph of {len(texts)} tokens: {nodes.n_features} active features, "
        f"{nodes.n_nodes} nodes; kept {result['kept_nodes']} nodes and "
        f"{result['kept_edges']} edges",
        f"replacement score {scores.replacement:.4f}, completeness {scores.completeness:.4f}",
        "likeliest next tokens: "
        + ", ".join(f"{item['token']!r} {item['probability']:.3f}" for item in logits),
        f"written to {out}",
    ]
    emit(result, as_json, quiet, lines)


Transcoders = list[SparseAutoencoder] | CrossLayerTranscoder


def read_transcoders(path: Path, device: str, dtype: str) -> Transcoders:
    """The transcoders ``--transcoders`` names (see the module docstring), in ``dtype``."""
    if not path.exists():
        raise FileNotFoundError(f"--transcoders {path}: no such file or folder")
    if is_clt_folder(path):
        return load_clt(path, device=device, dtype=cast(SAEDType, dtype))
    if path.is_file() or (path / CONFIG_NAME).is_file():
        return load_transcoder_set(path, device=device, dtype=cast(SAEDType, dtype))
    by_layer: dict[int, Path] = {}
    for entry in path.iterdir():
        match = LAYER_FOLDER.match(entry.name)
        if match and entry.is_dir():
            by_layer[int(match.group(1))] = entry
    if not by_layer:
        raise ConfigError(
            f"--transcoders {path}: no layer_0/, layer_1/, ... subfolders (saved SAEs), no "
            f"{CONFIG_NAME} (a circuit-tracer set) and no W_enc_0.safetensors (a cross-layer "
            "transcoder)"
        )
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise ConfigError(f"--transcoders {path}: no folder for layers {missing}")
    loaded = []
    for layer in range(len(by_layer)):
        sae = load_sae(by_layer[layer], device)
        loaded.append(sae.to(TORCH_DTYPES[dtype]))
    return loaded


def shown_features(graph: AttributionGraph, node_mask: Tensor) -> list[tuple[int, int]]:
    """``(layer, feature)`` of every feature node the mask keeps, sorted, once each."""
    nodes = graph.nodes
    chosen = node_mask[: nodes.n_features].nonzero()[:, 0]
    return sorted({(int(layer), int(feature)) for layer, _, feature in nodes.features[chosen]})


@torch.no_grad()
def feature_logit_effects(
    model: HookedTransformer,
    transcoders: Transcoders,
    keys: Sequence[tuple[int, int]],
    vocab: Sequence[str],
    k: int = LOGIT_EFFECTS,
) -> dict[tuple[int, int], list[tuple[str, float]]]:
    """Per ``(layer, feature)``, the tokens its decoder row raises and lowers most.

    A cross-layer feature's row is the sum of what it writes into every layer.
    The row goes through the final norm's linear part (centred for LayerNorm,
    times its weight; the input-dependent scale left out) and the unembedding,
    with the mean over the vocabulary taken off, as graph logits are.
    """
    if not keys:
        return {}
    layers = dictionaries(model, transcoders)
    rows = torch.cat([
        layers.decoder_rows(layer, torch.tensor([feature])).sum(1) for layer, feature in keys
    ])  # fmt: skip
    if model.cfg.normalization == "layernorm":
        rows = rows - rows.mean(-1, keepdim=True)
    weight = getattr(model.ln_final, "w", None)
    if weight is not None:
        rows = rows * weight
    effects = rows @ model.unembed.W_U
    effects = (effects - effects.mean(-1, keepdim=True)).float().cpu()
    n = min(k, effects.shape[-1])
    top, bottom = effects.topk(n), effects.topk(n, largest=False)
    found = {}
    for i, key in enumerate(keys):
        ids = top.indices[i].tolist() + bottom.indices[i].tolist()[::-1]
        values = top.values[i].tolist() + bottom.values[i].tolist()[::-1]
        found[key] = [(vocab[t], v) for t, v in zip(ids, values, strict=True)]
    return found


def feature_examples(
    model: HookedTransformer,
    transcoders: Transcoders,
    keys: Sequence[tuple[int, int]],
    corpus: Tensor,
    vocab: Sequence[str],
    k: int = EXAMPLES,
) -> dict[tuple[int, int], list[tuple[str, float]]]:
    """Per ``(layer, feature)``, its ``k`` top-activating contexts in ``corpus`` ``[n, pos]``.

    A context is the tokens before the peak and a few after, the peak token in
    brackets, e.g. ``"the cat [sat] on"``.
    """
    found: dict[tuple[int, int], list[tuple[str, float]]] = {}
    for layer in sorted({layer for layer, _ in keys}):
        one = (
            layer_transcoder(transcoders, layer)
            if isinstance(transcoders, CrossLayerTranscoder)
            else transcoders[layer]
        )
        stats = latent_statistics(
            one, model, corpus, top_k=k,
            context_before=CONTEXT_BEFORE, context_after=CONTEXT_AFTER,
        )  # fmt: skip
        for _, feature in (key for key in keys if key[0] == layer):
            shown = stats.examples(feature)
            rows = []
            for window, value in zip(shown.window_tokens.tolist(), shown.activations.tolist(),
                                     strict=True):  # fmt: skip
                parts = [f"[{vocab[t]}]" if offset == 0 else vocab[t]
                         for t, offset in zip(window, shown.offsets.tolist(), strict=True)
                         if t >= 0]  # fmt: skip
                rows.append((" ".join(parts), float(value)))
            found[(layer, feature)] = rows
    return found


def _token_strings(model: HookedTransformer, ids: Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(t) for t in ids.tolist()]
    return [str(t) for t in model.to_str_tokens(ids.cpu())]


class _Vocabulary(Sequence[str]):
    """Token id -> text, decoded when asked (a whole vocabulary up front would be slow).

    Without a tokenizer the text is the id; an id the tokenizer decodes to nothing is ``[id]``.
    """

    def __init__(self, model: HookedTransformer) -> None:
        self._tokenizer = model.tokenizer
        self._size = model.cfg.d_vocab

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._size))]
        if not -self._size <= index < self._size:
            raise IndexError(index)
        token = index % self._size
        if self._tokenizer is None:
            return str(token)
        return str(self._tokenizer.decode([token])) or f"[{token}]"  # no text: say which id
