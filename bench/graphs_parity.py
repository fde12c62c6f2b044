"""mitk's attribution graphs against circuit-tracer 0.5.0's: same model, same transcoders.

Runs in circuit-tracer's own environment (it pins transformer-lens 3.2 and
transformers 4.x)::

    make install-ct                                    # builds .venv-ct (about 2 minutes)
    OMP_NUM_THREADS=1 .venv-ct/bin/python bench/graphs_parity.py --case small
    OMP_NUM_THREADS=1 .venv-ct/bin/python bench/graphs_parity.py --case gpt2-small --rounds 1
    OMP_NUM_THREADS=1 .venv-ct/bin/python bench/graphs_parity.py --jumprelu --skip --no-timing
    OMP_NUM_THREADS=1 .venv-ct/bin/python bench/graphs_parity.py --clt --jumprelu --no-timing

mitk runs from this checkout (the repository goes on ``sys.path``; ``.venv-ct``
already has what ``mitk.analysis.graphs`` imports). The model and transcoders are
``bench/graphs.py``'s random GPT-2-shaped cases with a BOS-like first token
(``--jumprelu`` / ``--skip``: the transcoders as JumpReLU / with ``W_skip``); the
model goes to circuit-tracer through mitk's ``to_transformer_lens`` and the
transcoders through ``save_transcoder_set`` (circuit-tracer's set format), which
both tools then load from the same files. ``--clt`` makes one cross-layer
transcoder of them instead (their encoders, each layer's decoder in its own slot
and random decoders into every later layer), written by ``save_clt`` in
circuit-tracer's CLT format and loaded by both tools' ``load_clt``.

Reported: the kept features, logit targets and activations (must be equal), max
|adjacency difference| over the graph (target <= 1e-4), whether pruning with the
default thresholds keeps the same nodes and edges, both tools' replacement and
completeness scores; then both timed in one run, interleaved, best of ``--rounds``,
with the extra peak resident memory of one call of each in a fresh process (VmHWM
after resetting it through ``/proc/self/clear_refs``) and the load average, and the
ratio mitk / circuit-tracer (target <= 0.3).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any
import warnings

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from circuit_tracer import attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores  # noqa: E402
from circuit_tracer.graph import prune_graph as ct_prune_graph  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: E402
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.cross_layer_transcoder import (  # noqa: E402
    load_clt as ct_load_clt,
)
from circuit_tracer.transcoder.single_layer_transcoder import (  # noqa: E402
    load_transcoder_set as ct_load_transcoder_set,
)
from graphs import CASES, build  # noqa: E402  (bench/graphs.py)

from mitk.analysis.graphs import attribution_graph, graph_scores, prune_graph  # noqa: E402
from mitk.model.pretrained.tl_interop import to_transformer_lens  # noqa: E402
from mitk.sae import (  # noqa: E402
    CLTConfig,
    CrossLayerTranscoder,
    SparseAutoencoder,
    load_clt,
    save_clt,
)
from mitk.sae.transcoder_sets import load_transcoder_set, save_transcoder_set  # noqa: E402


class _Tokenizer(SimpleNamespace):
    """What circuit-tracer asks of a tokenizer for a prompt given as ids (no text)."""

    def decode(self, ids: Any) -> str:
        return " ".join(f"<{int(i)}>" for i in torch.as_tensor(ids).flatten().tolist())


def circuit_tracer_model(model: Any, set_folder: Path) -> TransformerLensReplacementModel:
    """The mitk model as circuit-tracer's TransformerLens replacement model, with the set."""
    tl = to_transformer_lens(model)
    ct = TransformerLensReplacementModel(tl.cfg)
    ct.load_state_dict(tl.state_dict())
    bos = model.cfg.d_vocab - 1
    ct.tokenizer = _Tokenizer(
        all_special_ids=[bos],
        bos_token_id=bos,
        pad_token_id=None,
        eos_token_id=bos,
        padding_side="right",
        vocab_size=model.cfg.d_vocab,
    )
    common: dict[str, Any] = dict(
        feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
        device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False,
    )  # fmt: skip
    if (set_folder / "W_enc_0.safetensors").exists():
        transcoders = ct_load_clt(str(set_folder), scan="mitk-bench", **common)
    else:
        files = sorted(set_folder.glob("layer_*.safetensors"), key=lambda p: int(p.stem[6:]))
        transcoders = ct_load_transcoder_set(
            {i: str(p) for i, p in enumerate(files)}, scan="mitk-bench", **common
        )
    ct._configure_replacement_model(transcoders)
    return ct


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed(call: Any) -> tuple[float, float, Any]:
    """Seconds, extra peak resident MiB, and the result of ``call()``.

    The memory is only meaningful in a fresh process (``--memory-of``): in one that
    ran the other tool, freed pages still resident hide new allocations.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is what is live
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _memory_kib("VmRSS")
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    return seconds, (_memory_kib("VmHWM") - before) / 1024, result


def peak_in_fresh_process(argv: list[str], tool: str) -> float:
    """Extra peak resident MiB of one call of ``tool``, in a new process of this script."""
    command = [sys.executable, __file__, *argv, "--memory-of", tool]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def compare(ct_graph: Any, graph: Any) -> bool:
    """Print how the two graphs compare; True when everything matches."""
    nodes = graph.nodes
    ct_features = ct_graph.active_features[ct_graph.selected_features]
    same_features = torch.equal(ct_features.long(), nodes.features.long())
    ct_tokens = torch.tensor([t.vocab_idx for t in ct_graph.logit_targets])
    same_logits = torch.equal(ct_tokens, nodes.logit_tokens.cpu())
    print(f"features: circuit-tracer {len(ct_features)} of {len(ct_graph.active_features)} "
          f"active, mitk {nodes.n_features}; same (layer, pos, id): {same_features}")  # fmt: skip
    print(f"logit targets: {ct_tokens.tolist()} vs {nodes.logit_tokens.tolist()}; same: "
          f"{same_logits}")  # fmt: skip
    if not (same_features and same_logits):
        return False
    act = (ct_graph.activation_values[ct_graph.selected_features] - nodes.activations).abs()
    prob = (ct_graph.logit_probabilities - nodes.logit_probabilities).abs()
    ours, theirs = graph.adjacency, ct_graph.adjacency_matrix
    diff = (ours - theirs).abs()
    worst = int(diff.argmax())
    print(f"max |activation diff| {float(act.max()):.2e}, |probability diff| "
          f"{float(prob.max()):.2e}")  # fmt: skip
    print(f"adjacency {tuple(ours.shape)}: max |diff| {float(diff.max()):.3e} at "
          f"{divmod(worst, ours.shape[1])} (max |edge| {float(theirs.abs().max()):.3e}); "
          f"non-zero edges mitk {int(torch.count_nonzero(ours)):,}, "
          f"circuit-tracer {int(torch.count_nonzero(theirs)):,}")  # fmt: skip
    pruned, ct_pruned = prune_graph(graph), ct_prune_graph(ct_graph)
    same_nodes = torch.equal(pruned.node_mask, ct_pruned.node_mask)
    edge_diff = int(torch.count_nonzero(pruned.edge_mask != ct_pruned.edge_mask))
    print(f"pruned (0.8, 0.98): nodes {pruned.kept_nodes} vs "
          f"{int(torch.count_nonzero(ct_pruned.node_mask))} (same: {same_nodes}); edges "
          f"{pruned.kept_edges:,} vs {int(torch.count_nonzero(ct_pruned.edge_mask)):,} "
          f"({edge_diff} differ)")  # fmt: skip
    scores = graph_scores(graph)
    ct_replacement, ct_completeness = compute_graph_scores(ct_graph)
    print(f"replacement mitk {scores.replacement:.6f} vs circuit-tracer {ct_replacement:.6f}; "
          f"completeness {scores.completeness:.6f} vs {ct_completeness:.6f}")  # fmt: skip
    scores_match = (
        abs(scores.replacement - ct_replacement) < 1e-4
        and abs(scores.completeness - ct_completeness) < 1e-4
    )
    return float(diff.max()) <= 1e-4 and same_nodes and edge_diff == 0 and scores_match


def variant(transcoders: list[Any], jumprelu: bool, skip: bool) -> list[Any]:
    """``bench/graphs.py``'s ReLU transcoders as JumpReLU (thresholds in [0, 0.5)) and/or with
    a random skip connection: the other forms circuit-tracer's set format holds."""
    if not (jumprelu or skip):
        return transcoders
    gen = torch.Generator().manual_seed(1)
    made = []
    for old in transcoders:
        cfg = dataclasses.replace(
            old.cfg, architecture="jumprelu" if jumprelu else old.cfg.architecture,
            skip_connection=skip,
        )  # fmt: skip
        new = SparseAutoencoder(cfg)
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(new, name).copy_(getattr(old, name))
            if jumprelu:
                new.log_threshold.copy_((torch.rand(cfg.d_sae, generator=gen) * 0.5).log())
            if skip:
                d = cfg.d_in
                new.W_skip.copy_(torch.randn(d, d, generator=gen) * 0.05 / d**0.5)
        made.append(new)
    return made


def cross_layer(transcoders: list[Any]) -> CrossLayerTranscoder:
    """One CLT of per-layer transcoders: their encoders, biases and thresholds, each layer's
    decoder in its own slot, and random decoders (a tenth of the own one's scale) into every
    later layer."""
    first = transcoders[0].cfg
    n_layers = len(transcoders)
    cfg = CLTConfig(
        n_layers=n_layers, d_model=first.d_in, d_sae=first.d_sae,
        activation="jumprelu" if first.architecture == "jumprelu" else "relu",
        input_hook="ln2.hook_normalized",
    )  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer, old in enumerate(transcoders):
            clt.W_enc[layer] = old.W_enc
            clt.b_enc[layer] = old.encoder_bias()
            clt.b_dec[layer] = old.b_dec
            if cfg.activation == "jumprelu":
                clt.log_threshold[layer] = old.log_threshold
            slots = clt.W_dec[layer]
            slots.copy_(torch.randn(slots.shape, generator=gen) * old.W_dec.std() * 0.1)
            slots[:, 0] = old.W_dec
    return clt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="small")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of each (best kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-feature-nodes", type=int, default=None,
                        help="cap on feature nodes (gpt2-small default 1024; 0: none)")  # fmt: skip
    parser.add_argument("--no-timing", action="store_true", help="parity only")
    parser.add_argument("--jumprelu", action="store_true", help="JumpReLU transcoders")
    parser.add_argument("--skip", action="store_true", help="skip-transcoders (W_skip)")
    parser.add_argument("--clt", action="store_true", help="one cross-layer transcoder")
    parser.add_argument("--memory-of", choices=["circuit-tracer", "mitk"],
                        help="(internal) one call's extra peak RSS in MiB, then exit")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # circuit-tracer's backward hooks on outputs only: expected there, and noisy
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    case = CASES[args.case]
    cap = args.max_feature_nodes
    if cap is None and args.case == "gpt2-small":
        cap = 1024
    cap = cap or None
    model, transcoders, tokens = build(case)
    transcoders = variant(transcoders, args.jumprelu, args.skip)
    tokens[0] = case.d_vocab - 1  # a "BOS": circuit-tracer keeps a special first token as is
    if args.memory_of is None:
        print(f"case {args.case}: {case}, cap {cap}, threads {args.threads}, "
              f"jumprelu {args.jumprelu}, skip {args.skip}, clt {args.clt}")  # fmt: skip
    if args.clt and args.skip:
        parser.error("circuit-tracer's CLT files hold no skip connection: --clt without --skip")
    mitk_transcoders: Any
    with tempfile.TemporaryDirectory() as tmp:
        if args.clt:
            folder = save_clt(cross_layer(transcoders), Path(tmp) / "clt")
            mitk_transcoders = load_clt(folder)
        else:
            folder = save_transcoder_set(transcoders, Path(tmp) / "set")
            mitk_transcoders = load_transcoder_set(folder)
        ct_model = circuit_tracer_model(model, folder)

    def run_ct() -> Any:
        return attribute(tokens, ct_model, max_feature_nodes=cap)

    def run_mitk() -> Any:
        return attribution_graph(model, mitk_transcoders, tokens, max_feature_nodes=cap)

    if args.memory_of is not None:
        run = run_ct if args.memory_of == "circuit-tracer" else run_mitk
        print(timed(run)[1])
        return 0
    print(f"loadavg before: {[round(x, 2) for x in os.getloadavg()]}")
    ct_time, _, ct_graph = timed(run_ct)
    mitk_time, _, graph = timed(run_mitk)
    print(f"first calls: circuit-tracer {ct_time:.3f} s, mitk {mitk_time:.3f} s")
    ok = compare(ct_graph, graph)
    print(f"PARITY {'OK' if ok else 'MISMATCH'}")
    del ct_graph, graph
    if not args.no_timing:
        times: dict[str, list[float]] = {"circuit-tracer": [], "mitk": []}
        for _ in range(args.rounds):
            for name, call in (("circuit-tracer", run_ct), ("mitk", run_mitk)):
                seconds, _, result = timed(call)
                del result
                times[name].append(seconds)
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-timing"]
        for name in times:
            peak = peak_in_fresh_process(rest, name)
            print(f"{name}: best {min(times[name]):.3f} s of {[round(t, 3) for t in times[name]]}"
                  f"; extra peak RSS of one call (fresh process) {peak:.0f} MiB")  # fmt: skip
        ratio = min(times["mitk"]) / min(times["circuit-tracer"])
        print(f"ratio mitk / circuit-tracer: {ratio:.3f} (target <= 0.3)")
    print(f"loadavg after: {[round(x, 2) for x in os.getloadavg()]}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
