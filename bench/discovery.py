"""Circuit-discovery benchmark: mitk's EAP-IG and ACDC against references, same data, one run.

transformer-lens 3.9 (the version in .venv) has no edge attribution patching: its
``tools.analysis.attribution_patching`` scores nodes only and raises NotImplementedError for
``granularity="edge"`` and ``ig_steps > 1``, and it has no ACDC. So the peers are:

- EAP-IG: ``TL EAP-IG reference``, edge attribution patching with integrated gradients (on
  inputs) written the way the EAP papers' code does on a TransformerLens ``HookedTransformer``:
  ``use_split_qkv_input``/``use_attn_result``/``use_hook_mlp_in``, one forward with the
  embeddings interpolated from corrupted to clean and one backward per integration step,
  gradients read at every ``hook_{q,k,v}_input``, ``hook_mlp_in`` and the final residual, and
  scores ``(clean - corrupted sender output) . mean gradient``. Its scores are checked against
  mitk's (``eap_ig(on="inputs", ablation="resample")``) before anything is timed. mitk is
  given the metric as a mitk user writes it, ``logit_diff(ANSWER, WRONG)`` (the same
  numbers; it tells mitk that only the last position is read, so only that one is
  unembedded); the reference reads ``model(tokens)[:, -1]`` as the EAP-IG code does.
- ACDC: ``naive ACDC``, the same criterion (KL to the full model; threshold: a share of the
  all-ablated run's KL) trying one edge per forward, in ACDC's order (receivers from the
  logits back, senders latest first), on mitk's masked run running every block for every
  edge (``reuse_clean_prefix=False``: the published algorithm's cost); against ``mitk acdc``,
  which tries all of a receiver's edges in one batched forward that starts at the
  receiver's block from the clean residual stream (nothing below it is ablated yet). Both
  run at layer granularity (a head-level ACDC on a 12-layer model is thousands of forwards:
  hours on a CPU). Their
  circuits are reported (size, KL, overlap); they may differ slightly, because the order in
  which edges are tried differs.

Model: a random-weight GPT-2-small-shaped checkpoint (12 layers, d_model 768, 12 heads, vocab
50257) written by ``bench/forward.py``'s ``save_checkpoint``; prompts are random tokens,
corrupted prompts are other random tokens, metric = logit[answer] - logit[wrong] at the last
position. Calls are interleaved, best-of-N, and the load average is printed: the machine is
shared. ``--quick`` runs a 2-layer model for the smoke test.

Run::

    python bench/discovery.py --quick
    python bench/discovery.py --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import os
from pathlib import Path
import random
import sys
import tempfile
import time
from typing import Any
import warnings

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import SEED, loadavg, no_network, save_checkpoint
from forward import Case as ModelCase


@dataclass(frozen=True)
class Case:
    model: ModelCase
    ig_steps: int
    acdc_threshold: float  # as a share of the KL divergence of the all-ablated run from the full
    acdc_seq: int


FULL = Case(
    ModelCase("gpt2-small 4x16", "gpt2", 12, 768, 12, 50257, 1024, batch=4, seq=16),
    ig_steps=5,
    acdc_threshold=0.02,
    acdc_seq=8,
)
QUICK = Case(
    ModelCase("gpt2-tiny 2x8", "gpt2", 2, 128, 2, 50257, 1024, batch=2, seq=8),
    ig_steps=3,
    acdc_threshold=0.1,
    acdc_seq=6,
)
ANSWER, WRONG = 1000, 2000


class LogitDiff:
    def __call__(self, logits: Tensor) -> Tensor:
        return logits[:, -1, ANSWER] - logits[:, -1, WRONG]


def tl_model(directory: Path) -> Any:
    """TL's legacy HookedTransformer on the checkpoint, unprocessed (as forward.py loads it)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(directory)
    cfg = loading.get_pretrained_model_config(
        str(directory), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu"
    )
    cfg.tokenizer_name = None
    state = loading.get_pretrained_state_dict(str(directory), cfg, hf_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    return model.eval()


def tl_eap_ig(model: Any, clean: Tensor, corrupted: Tensor, steps: int) -> Tensor:
    """EAP-IG (inputs) on TL hooks: ``[sender, receiver]`` in mitk's graph order."""
    n_layers = model.cfg.n_layers
    sender_hooks = ["hook_embed", "hook_pos_embed"]
    for L in range(n_layers):
        sender_hooks += [f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_mlp_out"]

    def senders(tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=sender_hooks)
        out = [cache["hook_embed"] + cache["hook_pos_embed"]]
        for L in range(n_layers):
            out += list(cache[f"blocks.{L}.attn.hook_result"].unbind(2))
            out.append(cache[f"blocks.{L}.hook_mlp_out"])
        return torch.stack(out), cache

    clean_out, clean_cache = senders(clean)
    corrupt_out, corrupt_cache = senders(corrupted)
    receiver_hooks = [f"blocks.{n_layers - 1}.hook_resid_post"]
    for L in range(n_layers):
        receiver_hooks += [f"blocks.{L}.hook_{c}_input" for c in "qkv"] + [
            f"blocks.{L}.hook_mlp_in"
        ]
    grads: dict[str, Tensor] = {}

    def keep(grad: Tensor, hook: Any) -> None:
        grads[hook.name] = grads.get(hook.name, 0) + grad.detach()

    for k in range(1, steps + 1):
        alpha = k / steps

        def interpolate(act: Tensor, hook: Any, alpha: float = alpha) -> Tensor:
            start, end = corrupt_cache[hook.name], clean_cache[hook.name]
            return (start + alpha * (end - start)).requires_grad_(True)  # so layer 0 has gradients

        fwd = [("hook_embed", interpolate), ("hook_pos_embed", interpolate)]
        with model.hooks(fwd_hooks=fwd, bwd_hooks=[(h, keep) for h in receiver_hooks]):
            LogitDiff()(model(clean)).sum().backward()
        model.zero_grad(set_to_none=True)
    columns = []
    for L in range(n_layers):
        for channel in "qkv":
            columns += list(grads[f"blocks.{L}.hook_{channel}_input"].unbind(2))
        columns.append(grads[f"blocks.{L}.hook_mlp_in"])
    columns.append(grads[f"blocks.{n_layers - 1}.hook_resid_post"])
    g = torch.stack(columns, 2)  # [batch, pos, receiver, d_model]
    return torch.einsum("sbpm,bprm->sr", clean_out - corrupt_out, g) / (steps * clean.shape[0])


def naive_acdc(run: Any, graph: Any, threshold: float) -> Any:
    """ACDC, one edge per forward (KL to the full model), receivers backwards, latest first."""
    keep = graph.present.float()

    def kl(mask: Tensor) -> float:
        with torch.no_grad():
            return float(run.kl(graph.fine_mask(mask[None])).mean())

    current = kl(keep)
    for r in reversed(range(len(graph.receivers))):
        for s in reversed(keep[:, r].nonzero().flatten().tolist()):
            trial = keep.clone()
            trial[s, r] = 0.0
            value = kl(trial)
            if value - current < threshold:
                keep, current = trial, value
    return keep


def best_of(rounds: int, contenders: dict[str, Any]) -> dict[str, float]:
    """Best wall time per contender, calls interleaved in a shuffled order each round."""
    order, best = random.Random(SEED), {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name in order.sample(list(contenders), len(contenders)):
            start = time.perf_counter()
            contenders[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer model, a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 2)
    import mitk
    from mitk.analysis.discovery import Circuit, EdgeGraph, Prompts, acdc, eap_ig
    from mitk.analysis.discovery.masked import MaskedRun
    from mitk.analysis.patching import logit_diff

    print(f"case: {case}\nthreads: {torch.get_num_threads()}  rounds: {rounds}")
    print(f"loadavg before: {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp, no_network():
        directory = Path(tmp)
        save_checkpoint(case.model, directory)
        model = mitk.HookedTransformer.from_pretrained(directory).eval()
        tl = tl_model(directory)
    gen = torch.Generator().manual_seed(SEED)
    shape = (case.model.batch, case.model.seq)
    clean = torch.randint(0, case.model.d_vocab, shape, generator=gen)
    corrupted = torch.randint(0, case.model.d_vocab, shape, generator=gen)
    prompts, metric = Prompts(clean, corrupted), LogitDiff()

    def mitk_eap() -> Any:
        return eap_ig(
            model, prompts, logit_diff(ANSWER, WRONG), ig_steps=case.ig_steps, on="inputs"
        )

    ours, theirs = mitk_eap().scores, tl_eap_ig(tl, clean, corrupted, case.ig_steps)
    scale = float(theirs.abs().max())
    diff = float((ours.nan_to_num() - theirs.masked_fill(ours.isnan(), 0)).abs().max())
    print(f"EAP-IG scores: max |mitk - TL reference| = {diff:.2e} (largest score {scale:.2e})")
    if diff > 1e-3 * scale:
        raise SystemExit("EAP-IG scores differ between mitk and the TL reference")
    eap = best_of(
        rounds,
        {
            "mitk eap_ig": mitk_eap,
            "TL EAP-IG reference": lambda: tl_eap_ig(tl, clean, corrupted, case.ig_steps),
        },
    )
    for name, seconds in eap.items():  # printed now: the ACDC part can take long on a CPU
        print(f"{name:<36} best {seconds:>9.3f} s")
    eap_ratio = eap["TL EAP-IG reference"] / eap["mitk eap_ig"]
    print(f"TL EAP-IG reference / mitk eap_ig: {eap_ratio:.2f}x  (loadavg {loadavg()})")

    short = Prompts(clean[:, : case.acdc_seq], corrupted[:, : case.acdc_seq])
    graph = EdgeGraph.of(model, "layers")
    run = MaskedRun(model, graph, short, metric, "resample", reuse_clean_prefix=False)
    with torch.no_grad():
        threshold = case.acdc_threshold * float(run.kl(run.keep_all(0.0)).mean())
    print(f"ACDC threshold (KL): {threshold:.4g}")
    found: dict[str, Any] = {}

    def batched() -> None:
        result = acdc(model, short, metric, threshold, granularity="layers")
        found["mitk"] = result.circuit

    def naive() -> None:
        found["naive"] = Circuit.from_mask(graph, naive_acdc(run, graph, threshold) > 0)

    timed = {"mitk acdc (batched)": batched, "naive ACDC (one edge per forward)": naive}
    acdc_times = best_of(rounds, timed)

    print(f"\n{'contender':<36} {'best s':>9}")
    for name, seconds in {**eap, **acdc_times}.items():
        print(f"{name:<36} {seconds:>9.3f}")
    for name, circuit in found.items():
        with torch.no_grad():
            kl = float(run.kl(graph.fine_mask(circuit.mask()[None].to(torch.float32))).mean())
        print(f"acdc {name}: {len(circuit)} of {graph.n_edges} layer edges, KL to full {kl:.4g}")
    overlap = found["mitk"].precision_recall(found["naive"])
    print(f"mitk circuit vs naive: precision {overlap[0]:.2f}, recall {overlap[1]:.2f}")
    print("\nratios (best times)")
    print(f"TL EAP-IG reference / mitk eap_ig: {eap_ratio:.2f}x")
    acdc_ratio = acdc_times["naive ACDC (one edge per forward)"] / acdc_times["mitk acdc (batched)"]
    print(f"naive ACDC / mitk acdc: {acdc_ratio:.2f}x")
    print(f"loadavg after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
