"""data.doc_packing (#1855's DocumentPackingLoader): each step's chunk lies inside one shard, a
shard is read from its first BOS on, a tail too short for a step is skipped and shards wrap;
the batches are deterministic, resumable and off is the plain stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.shards import DistributedTokenLoader, TokenStream, write_shard

BOS = 1
GLOBAL, SEQ = 32, 4  # world 2 x accumulation 2: 8 local tokens, a span of 9, a step chunk of 18 (world 2)


def doc_shards(tmp_path, seed: int = 0) -> tuple[str, list[np.ndarray]]:
    """Shards of documents ([BOS] + 2..15 tokens), each but the first opening inside a document;
    one shard is too short for a step and one has no BOS at all."""
    rng = np.random.default_rng(seed)
    shards = []
    for size in (70, 12, 55, 30, 64):
        tokens = rng.integers(2, 60, size)
        pos = 0 if not shards else int(rng.integers(1, 6))  # a leading fragment of the previous document
        while size != 30 and pos < size:
            tokens[pos] = BOS
            pos += int(rng.integers(3, 17))
        shards.append(tokens)
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"d_{i:03d}.bin", tokens)
    return str(tmp_path / "d_*.bin"), shards


def reference_chunks(shards: list[np.ndarray], chunk: int, steps: int) -> list[np.ndarray]:
    """#1855's loop, restated: the cursor starts at a shard's first BOS; while the step does not
    fit in the shard, go to the next (wrapping); take the chunk; advance by it."""
    out, index = [], 0
    def first_bos(i):
        hits = np.flatnonzero(shards[i] == BOS)
        return int(hits[0]) if hits.size else len(shards[i])
    cursor = first_bos(0)
    while len(out) < steps:
        while cursor + chunk > len(shards[index]):
            index = (index + 1) % len(shards)
            cursor = first_bos(index)
        out.append(shards[index][cursor:cursor + chunk])
        cursor += chunk
    return out


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_follow_1855_loader(tmp_path, prefetch):
    pattern, shards = doc_shards(tmp_path)
    loaders = [DistributedTokenLoader(pattern, r, 2, bos_id=BOS, prefetch=prefetch) for r in range(2)]
    expected = reference_chunks(shards, 18, 14)  # wraps the shard list twice
    shard, opened = None, 0
    for chunk in expected:
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch(GLOBAL, SEQ, 2)
            local = chunk[rank * 9:(rank + 1) * 9]
            assert x.tolist() == local[:-1].reshape(-1, SEQ).tolist() and y.tolist() == local[1:].reshape(-1, SEQ).tolist()
        if not prefetch and loaders[0].stream.file_index != shard:  # a shard's first step starts at its first BOS
            shard = loaders[0].stream.file_index
            opened += 1
            assert chunk[0] == BOS and shard in (0, 2, 4)  # the short shard and the BOS-less one skipped
    assert prefetch or opened >= 5
    for loader in loaders:
        loader.close()


def test_resumes_where_it_stopped(tmp_path):
    pattern, _ = doc_shards(tmp_path, seed=1)
    a = DistributedTokenLoader(pattern, 0, 1, bos_id=BOS)
    for _ in range(5):
        a.next_batch(16, 4)
    b = DistributedTokenLoader(pattern, 0, 1, bos_id=BOS)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(16, 4), b.next_batch(16, 4)))


def test_off_is_the_plain_stream(tmp_path):
    pattern, shards = doc_shards(tmp_path)
    plain, off = TokenStream(pattern), TokenStream(pattern, bos_id=None)
    assert plain.take(300).tolist() == off.take(300).tolist() == np.concatenate(shards * 2)[:300].tolist()


def test_no_shard_long_enough(tmp_path):
    pattern, _ = doc_shards(tmp_path)
    with pytest.raises(ValueError, match="data.doc_packing"):
        TokenStream(pattern, bos_id=BOS).take(80)
