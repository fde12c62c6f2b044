"""Cache a forward pass, read activations by name, and ablate a head with a hook.

Run: python examples/cache_and_hooks.py
"""

from __future__ import annotations

import torch

from mitk import HookedTransformer, hooks
from mitk.sequences import repeated_random_tokens


def repeated_half_loss(logits: torch.Tensor, tokens: torch.Tensor, half: int) -> float:
    """Mean next-token loss over the predictions made inside the repeated copy."""
    nll = -logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return float(nll[:, half + 1 :].mean())


def main() -> None:
    model = HookedTransformer.from_pretrained("toy-induction")  # embedded: no download
    half = 20
    tokens = repeated_random_tokens(8, half, model.cfg.d_vocab, torch.Generator().manual_seed(0))

    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    print(f"cached {len(cache)} activations, e.g.")
    for key in list(cache)[:3]:
        print(f"  {key:<26} {tuple(cache[key].shape)}")
    print(f"clean loss on the repeated half: {repeated_half_loss(logits, tokens, half):.3f} nats")

    def zero_all_heads(z: torch.Tensor, hook: object) -> torch.Tensor:
        return torch.zeros_like(z)  # z: [batch, pos, head, d_head]

    with torch.no_grad():
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(hooks.name("z", 1), zero_all_heads)])
    loss = repeated_half_loss(ablated, tokens, half)
    print(f"with layer 1's heads zero-ablated:  {loss:.3f} nats")

    seen = []
    with torch.no_grad(), model.hooks([(hooks.name("pattern", 0), lambda p, h: seen.append(p))]):
        model(tokens)
    print(f"pattern hook saw {tuple(seen[0].shape)}; attention paths: {model.attention_paths()}")


if __name__ == "__main__":
    main()
