"""Activation stores and token sources: deterministic batches of real model activations."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch
from torch import Tensor

from mitk import HookedTransformer
from mitk.errors import (
    ConfigError,
    InvalidTokensError,
    SequenceTooLongError,
    ShapeMismatchError,
    UnknownHookError,
)
from mitk.model import NoTokenizerError
from mitk.sae.chunks import CachedActivations, CacheMismatchError, ChunkNotCachedError
from mitk.sae.sources import ActivationSource, TensorActivations, seeded_permutation
from mitk.sae.store import ActivationStore
from mitk.sae.tokens import (
    ShardDirTokens,
    TensorTokens,
    TextFileTokens,
    TokenFileNotFoundError,
    TokenSource,
    write_token_shards,
)
from tests.checkpoints import WORDS, word_tokenizer

RESID = "blocks.0.hook_resid_post"


@pytest.fixture
def seqs() -> Tensor:
    """24 random sequences; distinct first tokens so no two positions share an activation."""
    tokens = torch.randint(0, 50, (24, 16), generator=torch.Generator().manual_seed(7))
    tokens[:, 0] = torch.arange(24)
    return tokens


def small_store(model: HookedTransformer, tokens: object, **kwargs: object) -> ActivationStore:
    # raw activations unless a test asks: most tests compare rows with a plain forward
    settings: dict = {"batch_size": 16, "buffer_batches": 4, "model_batch_size": 3,
                      "normalize": False, **kwargs}  # fmt: skip
    return ActivationStore(model, settings.pop("hooks", RESID), tokens, **settings)  # type: ignore[arg-type]


def direct(model: HookedTransformer, tokens: Tensor, name: str) -> Tensor:
    """``[n * pos, d]``: the hook's activations computed in one plain forward."""
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    return cache[name].reshape(tokens.shape[0] * tokens.shape[1], -1)


def match_rows(rows: Tensor, reference: Tensor) -> Tensor:
    """For each row, the index of the reference row it equals (fails if none is within 1e-5)."""
    dist = torch.cdist(rows.double(), reference.double())
    best = dist.min(dim=1)
    assert float(best.values.max()) < 1e-5, "a batch row is not an activation of the model"
    return best.indices


@contextmanager
def count_calls(*modules: torch.nn.Module) -> Iterator[list[int]]:
    counts = [0] * len(modules)

    def counter(slot: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            counts[slot] += 1

        return hook

    handles = [m.register_forward_hook(counter(i)) for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


# --- ActivationStore -------------------------------------------------------------------


def test_batches_are_pure_functions_of_step(tiny: HookedTransformer, seqs: Tensor) -> None:
    store = small_store(tiny, seqs)
    assert isinstance(store, ActivationSource)
    first = store.batch(5)
    assert set(first) == {RESID} and first[RESID].shape == (16, 32)
    assert torch.equal(store.batch(5)[RESID], first[RESID])
    later = store.batch(13)  # chunk 3, then back to chunk 1: recomputed, same bits
    assert torch.equal(store.batch(5)[RESID], first[RESID])
    fresh = small_store(tiny, seqs)
    assert torch.equal(fresh.batch(13)[RESID], later[RESID])
    assert torch.equal(fresh.batch(5)[RESID], first[RESID])
    assert not torch.equal(store.batch(4)[RESID], first[RESID])
    assert not torch.equal(small_store(tiny, seqs, seed=1).batch(5)[RESID], first[RESID])
    json.dumps(store.fingerprint())


def test_chunk_is_a_shuffle_of_its_sequences_activations(
    tiny: HookedTransformer, seqs: Tensor
) -> None:
    store = small_store(tiny, seqs)
    for chunk in (0, 2):
        # 64 rows per chunk from 16-token sequences: exactly four sequences, every position once
        used = store.sequence_indices(chunk)
        assert used.shape == (4,)
        reference = direct(tiny, seqs[used], RESID)
        rows = torch.cat([store.batch(chunk * 4 + j)[RESID] for j in range(4)])
        assert sorted(match_rows(rows, reference).tolist()) == list(range(64))


def test_sequence_walk_wraps_into_new_epochs(tiny: HookedTransformer, seqs: Tensor) -> None:
    store = small_store(tiny, seqs[:3])  # 4 sequences per chunk, 3 in the source
    walk = torch.cat([store.sequence_indices(c) for c in range(3)])
    epochs = walk.reshape(4, 3)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == [0, 1, 2]
    assert len({tuple(e.tolist()) for e in epochs}) > 1  # each epoch reshuffled


def test_several_hooks_in_one_pass_stopping_early(tiny: HookedTransformer, seqs: Tensor) -> None:
    hooks = [RESID, "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    store = small_store(tiny, seqs, hooks=hooks, model_batch_size=2)
    assert store.stop_at_layer == 1
    assert store.d_in == {RESID: 32, "blocks.0.attn.hook_z": 32, "blocks.0.mlp.hook_post": 128}
    with count_calls(tiny.embed, tiny.blocks[1]) as calls:
        batch = store.batch(0)
    assert calls == [2, 0]  # 4 sequences in 2 forwards for all three hooks; block 1 never ran
    used = seqs[store.sequence_indices(0)]
    # rows stay aligned across hooks: row i of each hook comes from the same token position
    where = [match_rows(batch[name], direct(tiny, used, name)) for name in hooks]
    assert torch.equal(where[0], where[1]) and torch.equal(where[0], where[2])


def test_final_norm_hook_runs_the_whole_model(tiny: HookedTransformer, seqs: Tensor) -> None:
    store = small_store(tiny, seqs, hooks="ln_final.hook_normalized")
    assert store.stop_at_layer is None
    with count_calls(tiny.blocks[1]) as calls:
        rows = store.batch(0)["ln_final.hook_normalized"]
    assert calls == [2]
    match_rows(rows, direct(tiny, seqs[store.sequence_indices(0)], "ln_final.hook_normalized"))
    assert small_store(tiny, seqs, hooks="hook_embed").stop_at_layer == 0


def test_normalize_scales_to_sqrt_d_in(tiny: HookedTransformer, seqs: Tensor) -> None:
    plain = small_store(tiny, seqs, hooks=[RESID, "blocks.1.mlp.hook_post"])
    scaled = small_store(tiny, seqs, hooks=[RESID, "blocks.1.mlp.hook_post"], normalize=True)
    assert plain.scale(RESID) == 1.0
    for name, width in scaled.d_in.items():
        rows = torch.cat([scaled.batch(j)[name] for j in range(4)])  # all of chunk 0
        assert float(rows.norm(dim=-1).mean()) == pytest.approx(math.sqrt(width), rel=1e-5)
        assert scaled.scale(name) != 1.0
        expected = plain.batch(6)[name] * scaled.scale(name)
        assert torch.allclose(scaled.batch(6)[name], expected)


def test_device_and_dtype(tiny: HookedTransformer, seqs: Tensor) -> None:
    batch = small_store(tiny, seqs, dtype=torch.float64, device="cpu").batch(0)[RESID]
    assert batch.dtype == torch.float64 and batch.device.type == "cpu"


def test_cache_dir_reproduces_batches(tiny: HookedTransformer, seqs: Tensor, tmp_path: Path):
    cache = tmp_path / "acts"
    store = small_store(tiny, seqs, cache_dir=cache, normalize=True)
    paths = store.fill_cache(2, progress=False)
    assert [p.name for p in paths] == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    assert json.loads((cache / "manifest.json").read_text())["fingerprint"] == store.fingerprint()
    assert not list(cache.glob(".*tmp"))  # no temp files left behind
    expected = {step: store.batch(step)[RESID] for step in (0, 5, 7)}

    reread = small_store(tiny, seqs, cache_dir=cache, normalize=True)
    with count_calls(tiny.embed) as calls:
        for step, rows in expected.items():
            assert torch.equal(reread.batch(step)[RESID], rows)
    assert calls == [0]  # served from disk
    assert reread.scale(RESID) == store.scale(RESID)

    replay = CachedActivations(cache)
    assert isinstance(replay, ActivationSource)
    assert replay.fingerprint() == store.fingerprint()
    assert replay.d_in == store.d_in and replay.batch_size == 16
    assert replay.scale(RESID) == store.scale(RESID)
    for step, rows in expected.items():
        assert torch.equal(replay.batch(step)[RESID], rows)
    with pytest.raises(ChunkNotCachedError, match=r"chunk 2 .*holds chunks 0\.\.1"):
        replay.batch(8)


def test_cache_manifest_mismatch_is_refused(
    tiny: HookedTransformer, seqs: Tensor, tmp_path: Path
) -> None:
    small_store(tiny, seqs, cache_dir=tmp_path).fill_cache(1, progress=False)
    with pytest.raises(CacheMismatchError, match="seed"):
        small_store(tiny, seqs, cache_dir=tmp_path, seed=3)
    other = HookedTransformer(tiny.cfg, seed=2)  # same config, other weights
    with pytest.raises(CacheMismatchError, match="model"):
        small_store(other, seqs, cache_dir=tmp_path)
    with pytest.raises(ChunkNotCachedError, match="not an activation cache"):
        CachedActivations(tmp_path / "nothing")


def test_bad_store_inputs(tiny: HookedTransformer, seqs: Tensor) -> None:
    with pytest.raises(UnknownHookError, match=r"did you mean 'blocks\.0\.hook_resid_post'"):
        small_store(tiny, seqs, hooks="blocks.0.hook_resid_pots")
    with pytest.raises(ConfigError, match="per-position"):
        small_store(tiny, seqs, hooks="blocks.0.attn.hook_pattern")
    with pytest.raises(ConfigError, match="longer than the token source"):
        small_store(tiny, seqs, context_size=20)
    with pytest.raises(SequenceTooLongError):
        small_store(tiny, torch.zeros((4, 20), dtype=torch.long))
    with pytest.raises(ConfigError, match="batch_size"):
        small_store(tiny, seqs, batch_size=0)
    with pytest.raises(InvalidTokensError, match="outside the vocabulary"):
        small_store(tiny, seqs.clone().fill_(60)).batch(0)
    with pytest.raises(ConfigError, match="step"):
        small_store(tiny, seqs).batch(-1)


def test_shorter_context_uses_sequence_prefixes(tiny: HookedTransformer, seqs: Tensor) -> None:
    store = small_store(tiny, seqs, context_size=8)
    assert store.sequences_per_chunk == 8
    match_rows(store.batch(0)[RESID], direct(tiny, seqs[store.sequence_indices(0), :8], RESID))


# --- token sources -------------------------------------------------------------------


def write_text(path: Path, n_words: int) -> list[str]:
    words = [WORDS[(i * 7) % len(WORDS)] for i in range(n_words)]
    lines = [" ".join(words[i : i + 5]) for i in range(0, n_words, 5)]
    path.write_text("\n".join(lines) + "\n")
    return words


def test_text_file_rows_start_with_bos(tmp_path: Path) -> None:
    tok = word_tokenizer()
    words = write_text(tmp_path / "t.txt", 50)
    ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in words])
    source = TextFileTokens(tmp_path / "t.txt", tok, context_size=8)
    assert isinstance(source, TokenSource)
    assert (source.n_sequences, source.context_size) == (7, 8)  # 50 // 7, last partial dropped
    rows = source.sequences(torch.arange(7))
    assert torch.equal(rows[:, 0], torch.full((7,), tok.bos_token_id))
    assert torch.equal(rows[:, 1:].reshape(-1), ids[:49])
    plain = TextFileTokens(tmp_path / "t.txt", tok, context_size=8, prepend_bos=False)
    assert torch.equal(plain.sequences(torch.tensor([1])), ids[8:16][None])


def test_text_file_store_excludes_bos(gpt2: HookedTransformer, tmp_path: Path) -> None:
    write_text(tmp_path / "t.txt", 120)
    store = ActivationStore(gpt2, "blocks.0.hook_resid_pre", tmp_path / "t.txt", context_size=8,
                            batch_size=14, buffer_batches=2, model_batch_size=4,
                            normalize=False)  # fmt: skip
    assert store.bos_token_id == 0 and store.sequences_per_chunk == 4  # 28 rows, 7 per sequence
    used = store.tokens.sequences(store.sequence_indices(0))
    reference = direct(gpt2, used, "blocks.0.hook_resid_pre").reshape(4, 8, -1)
    rows = torch.cat([store.batch(j)["blocks.0.hook_resid_pre"] for j in range(2)])
    assert sorted(match_rows(rows, reference[:, 1:].reshape(28, -1)).tolist()) == list(range(28))
    keep_bos = ActivationStore(gpt2, "blocks.0.hook_resid_pre", tmp_path / "t.txt",
                               context_size=8, batch_size=14, buffer_batches=2,
                               exclude_bos=False, normalize=False)  # fmt: skip
    assert keep_bos.sequences_per_chunk == 4
    assert torch.cdist(keep_bos.chunk(0)["blocks.0.hook_resid_pre"], reference[:1, 0]).min() < 1e-5


def test_text_file_errors(gpt2: HookedTransformer, tiny: HookedTransformer, tmp_path: Path):
    tok = word_tokenizer()
    with pytest.raises(TokenFileNotFoundError):
        TextFileTokens(tmp_path / "missing.txt", tok, 8)
    with pytest.raises(TokenFileNotFoundError):
        ActivationStore(gpt2, RESID, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="no tokens"):
        TextFileTokens(tmp_path / "empty.txt", tok, 8)
    write_text(tmp_path / "short.txt", 5)
    with pytest.raises(ConfigError, match="fewer than one row"):
        TextFileTokens(tmp_path / "short.txt", tok, 8)
    with pytest.raises(NoTokenizerError):
        ActivationStore(tiny, RESID, tmp_path / "short.txt")


def test_shard_dir_matches_tensor_source(
    tiny: HookedTransformer, seqs: Tensor, tmp_path: Path
) -> None:
    paths = write_token_shards(seqs.int(), tmp_path / "shards", rows_per_shard=10)
    assert [p.name for p in paths] == [f"tokens_0000{i}.safetensors" for i in range(3)]
    source = ShardDirTokens(tmp_path / "shards")
    assert (source.n_sequences, source.context_size) == (24, 16)
    picks = torch.tensor([23, 0, 10, 9, 15, 10])
    assert torch.equal(source.sequences(picks), seqs[picks])
    from_dir = small_store(tiny, tmp_path / "shards")
    from_tensor = small_store(tiny, TensorTokens(seqs))
    assert torch.equal(from_dir.batch(9)[RESID], from_tensor.batch(9)[RESID])
    assert source.fingerprint() == ShardDirTokens(tmp_path / "shards").fingerprint()
    with pytest.raises(ConfigError, match="already holds"):
        write_token_shards(seqs, tmp_path / "shards", 10)


def test_shard_dir_errors(seqs: Tensor, tmp_path: Path) -> None:
    with pytest.raises(TokenFileNotFoundError):
        ShardDirTokens(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        ShardDirTokens(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    write_token_shards(seqs, mixed, 12)
    save_file({"tokens": seqs[:, :8].contiguous()}, mixed / "z_extra.safetensors")
    with pytest.raises(ConfigError, match="mix context sizes"):
        ShardDirTokens(mixed)
    (tmp_path / "wrong").mkdir()
    save_file({"ids": seqs}, tmp_path / "wrong" / "a.safetensors")
    with pytest.raises(ConfigError, match="no 'tokens' tensor"):
        ShardDirTokens(tmp_path / "wrong")
    with pytest.raises(InvalidTokensError):
        TensorTokens(seqs.float())


# --- TensorActivations ---------------------------------------------------------------


def test_tensor_activations_epochs_follow_the_seeded_permutation() -> None:
    acts = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    source = TensorActivations(acts, batch_size=16, seed=4, normalize=False)
    assert isinstance(source, ActivationSource)
    assert source.hook_names == ("activations",) and source.d_in == {"activations": 6}
    for epoch in range(2):
        order = seeded_permutation(50, 4, epoch)
        for j in range(3):  # 50 // 16 = 3 batches, 2 rows dropped
            rows = order[j * 16 : (j + 1) * 16]
            assert torch.equal(source.batch(epoch * 3 + j)["activations"], acts[rows])
    fresh = TensorActivations(acts, batch_size=16, seed=4, normalize=False)
    assert torch.equal(fresh.batch(4)["activations"], source.batch(4)["activations"])
    assert not torch.equal(source.batch(0)["activations"], source.batch(3)["activations"])
    json.dumps(source.fingerprint())


def test_tensor_activations_dict_normalize_and_errors() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 4, generator=gen) * 5, torch.randn(40, 9, generator=gen)
    source = TensorActivations({"a": a, "b": b}, batch_size=8, normalize=True)
    batch = source.batch(2)
    rows_a, rows_b = batch["a"] / source.scale("a"), batch["b"] / source.scale("b")
    assert torch.equal(match_rows(rows_a, a), match_rows(rows_b, b))  # aligned rows
    everything = torch.cat([source.batch(j)["a"] for j in range(5)])
    assert float(everything.norm(dim=-1).mean()) == pytest.approx(2.0, rel=1e-5)

    with pytest.raises(ConfigError, match="batch_size=64"):
        TensorActivations(a, batch_size=64)
    broken = a.clone()
    broken[3, 1], broken[7, 0] = float("nan"), float("inf")
    with pytest.raises(ShapeMismatchError, match="'x' hold 2 non-finite"):
        TensorActivations({"x": broken}, batch_size=8)
    with pytest.raises(ShapeMismatchError, match=r"\[n, d_in\]"):
        TensorActivations(a[None], batch_size=8)
    with pytest.raises(ShapeMismatchError, match="same number of rows"):
        TensorActivations({"a": a, "b": b[:30]}, batch_size=8)
