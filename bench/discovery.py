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
- ACDC, all at layer granularity (a head-level ACDC on a 12-layer model is thousands of
  forwards: hours on a CPU), one criterion (KL of the circuit's next-token distribution from
  the full model's, averaged over positions and prompts; threshold: a share of the
  all-ablated run's KL; resample ablation from the corrupted prompts) and ACDC's order
  (receivers from the logits back, senders latest first; a node that sends nowhere any more
  is dropped with its inputs). Contenders:

  - ``mitk acdc``: tries a receiver's edges several at a time in one batched forward that
    starts at the receiver's block from the clean residual stream (nothing below it is
    ablated yet);
  - ``naive ACDC``: an algorithm-level baseline on mitk's own engine, one edge per forward,
    the masked run running every block for every edge (``reuse_clean_prefix=False``: the
    published algorithm's cost without its framework);
  - ``TL ACDC reference``: the stand-in for a transformer-lens implementation, since the
    published ACDC code (Conmy et al. 2023) is built on TransformerLens hooks. It is written
    that way here: one full ``HookedTransformer`` forward per edge tried, sender hooks
    (``hook_embed`` + ``hook_pos_embed``, ``hook_attn_out``, ``hook_mlp_out``) recording each
    sender's output in that run, receiver hooks (``hook_attn_in`` with ``use_attn_in``, one
    copy per head, each corrected alike; ``hook_mlp_in``; the last ``hook_resid_post``, read
    only by the final norm) subtracting ``output - corrupted output`` for every removed edge
    into them, the corrupted outputs cached from one run on the corrupted prompts. No mitk
    code runs inside it; it toggles the TL model's settings for its calls and restores them.

  The three circuits must be identical (checked before anything is timed, with each one's
  KL through mitk's masked run).

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
from collections.abc import Callable
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


def one_edge_acdc(
    senders: list[str],
    receivers: list[str],
    present: Tensor,
    kl: Callable[[Tensor], float],
    threshold: float,
) -> tuple[Tensor, float]:
    """ACDC one edge per forward, the loop both references run: receivers from the logits
    back, senders latest first, a receiver whose node sends nowhere any more dropped with its
    inputs. ``kl(keep)`` scores the bool ``[sender, receiver]`` mask; returns the kept mask
    and its KL."""
    keep = present.clone()
    current = kl(keep)
    for r in reversed(range(len(receivers))):
        node = senders.index(receivers[r]) if receivers[r] in senders else None
        if node is not None and not keep[node].any():  # it sends nowhere: drop it
            keep[:, r] = False
            continue
        for s in reversed(keep[:, r].nonzero().flatten().tolist()):
            keep[s, r] = False
            value = kl(keep)
            if value - current < threshold:
                current = value
            else:
                keep[s, r] = True
    return keep, current


def naive_acdc(run: Any, graph: Any, threshold: float) -> Tensor:
    """ACDC on mitk's masked run, one edge per forward (KL to the full model)."""

    def kl(keep: Tensor) -> float:
        with torch.no_grad():
            return float(run.kl(graph.fine_mask(keep.float()[None])).mean())

    senders, receivers = list(graph.senders), list(graph.receivers)
    return one_edge_acdc(senders, receivers, graph.present, kl, threshold)[0]


def layer_nodes(n_layers: int) -> tuple[list[str], list[str], Tensor]:
    """Layer-level senders, receivers and ``present[s, r]`` (s writes before r reads)."""
    senders = ["embed"] + [f"L{L}_{part}" for L in range(n_layers) for part in ("attn", "mlp")]
    receivers = [*senders[1:], "logits"]
    # sender j writes at step j of the forward, receiver i reads at step i + 1
    return senders, receivers, torch.ones(len(senders), len(receivers), dtype=torch.bool).triu()


def tl_acdc(model: Any, clean: Tensor, corrupted: Tensor, threshold: float) -> tuple[Tensor, float]:
    """ACDC on TL hooks, one forward per edge tried: the kept ``[sender, receiver]`` mask, its KL.

    As the published ACDC code runs: sender hooks record each sender's output in this very
    run, receiver hooks subtract, for each removed edge, (that output - the sender's output
    on the corrupted prompt); the hooks stay installed and read the current mask.
    """
    n = model.cfg.n_layers
    senders, receivers, present = layer_nodes(n)
    sender_of = {"hook_embed": 0, "hook_pos_embed": 0}  # embed = token + position embedding
    for L in range(n):
        sender_of[f"blocks.{L}.hook_attn_out"] = 1 + 2 * L
        sender_of[f"blocks.{L}.hook_mlp_out"] = 2 + 2 * L
    receiver_of = {f"blocks.{n - 1}.hook_resid_post": 2 * n}  # only the final norm reads it
    for L in range(n):
        receiver_of[f"blocks.{L}.hook_attn_in"] = 2 * L
        receiver_of[f"blocks.{L}.hook_mlp_in"] = 2 * L + 1
    mask = {"keep": present}  # the mask being scored, read by the receiver hooks
    out: dict[int, Tensor] = {}

    def record(act: Tensor, hook: Any) -> None:
        s = sender_of[hook.name]
        out[s] = out[s] + act if s in out else act

    def patch(act: Tensor, hook: Any) -> Tensor | None:
        r = receiver_of[hook.name]
        removed = (present[:, r] & ~mask["keep"][:, r]).nonzero().flatten().tolist()
        if not removed:
            return None
        delta = sum(out[s] - corrupt[s] for s in removed)
        return act - (delta[:, :, None] if act.dim() == 4 else delta)  # attn_in: every head

    # TL feeds attention from the split q/k/v inputs (the EAP reference's setting) over
    # hook_attn_in when both are on, so split is off here; per-head results would only cost time
    settings = dict(
        use_split_qkv_input=False, use_attn_result=False, use_attn_in=True, use_hook_mlp_in=True
    )
    saved = {k: getattr(model.cfg, k) for k in settings}
    for k, v in settings.items():
        setattr(model.cfg, k, v)
    try:
        with torch.no_grad():
            with model.hooks(fwd_hooks=[(h, record) for h in sender_of]):
                model(corrupted)
            corrupt = dict(out)
            log_p = model(clean).float().log_softmax(-1)
            p = log_p.exp()

            def kl(keep: Tensor) -> float:  # KL(full || circuit), over prompts and positions
                mask["keep"] = keep
                out.clear()
                log_q = model(clean).float().log_softmax(-1)
                return float((p * (log_p - log_q)).sum(-1).mean())

            hooks = [(h, record) for h in sender_of] + [(h, patch) for h in receiver_of]
            with model.hooks(fwd_hooks=hooks):
                return one_edge_acdc(senders, receivers, present, kl, threshold)
    finally:
        for k, v in saved.items():
            setattr(model.cfg, k, v)


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
    senders, receivers, present = layer_nodes(case.model.n_layers)
    if (senders, receivers) != (list(graph.senders), list(graph.receivers)) or not torch.equal(
        present, graph.present
    ):
        raise SystemExit("the TL reference's layer graph differs from mitk's")
    found: dict[str, Any] = {}
    own_kl: dict[str, float] = {}  # the TL reference's KL of its circuit, on its own hooks

    def batched() -> None:
        result = acdc(model, short, metric, threshold, granularity="layers")
        found["mitk"] = result.circuit

    def naive() -> None:
        found["naive"] = Circuit.from_mask(graph, naive_acdc(run, graph, threshold) > 0)

    def reference() -> None:
        keep, own_kl["TL"] = tl_acdc(tl, short.clean, short.corrupted, threshold)
        found["TL"] = Circuit.from_mask(graph, keep)

    timed = {
        "mitk acdc (batched)": batched,
        "naive ACDC (one edge per forward)": naive,
        "TL ACDC reference": reference,
    }
    for contender in timed.values():  # the circuits, checked before anything is timed
        contender()
    for name, circuit in found.items():
        with torch.no_grad():
            kl = float(run.kl(graph.fine_mask(circuit.mask()[None].to(torch.float32))).mean())
        own = f" (on TL hooks {own_kl[name]:.4g})" if name in own_kl else ""
        print(
            f"acdc {name}: {len(circuit)} of {graph.n_edges} layer edges, KL to full {kl:.4g}{own}"
        )
    for other in ("naive", "TL"):
        precision, recall = found["mitk"].precision_recall(found[other])
        print(f"mitk circuit vs {other}: precision {precision:.2f}, recall {recall:.2f}")
    if any(found[other] != found["mitk"] for other in ("naive", "TL")):
        raise SystemExit("the ACDC circuits differ")
    acdc_times = best_of(rounds, timed)

    print(f"\n{'contender':<36} {'best s':>9}")
    for name, seconds in {**eap, **acdc_times}.items():
        print(f"{name:<36} {seconds:>9.3f}")
    print("\nratios (best times)")
    print(f"TL EAP-IG reference / mitk eap_ig: {eap_ratio:.2f}x")
    mitk_acdc = acdc_times["mitk acdc (batched)"]
    naive_ratio = acdc_times["naive ACDC (one edge per forward)"] / mitk_acdc
    print(f"naive ACDC / mitk acdc: {naive_ratio:.2f}x")
    print(f"TL ACDC reference / mitk acdc: {acdc_times['TL ACDC reference'] / mitk_acdc:.2f}x")
    print(f"loadavg after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
