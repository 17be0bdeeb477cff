"""The prefetching loader (a background thread cutting batches ahead) equals the synchronous one.

On CPU the thread runs without pinned memory; the pinned ring and its CUDA events are GPU-only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgolf.data.shards import DistributedTokenLoader, ShardError, write_shard


def shards(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"s_{i:06d}.bin", rng.integers(0, 500, n))
    return str(tmp_path / "s_*.bin")


def batches(loader, requests):
    out = []
    for request in requests:
        x, y = loader.next_batch(*request)
        out.append((x.clone(), y.clone(), json.dumps(loader.state_dict(), sort_keys=True)))
    return out


@pytest.mark.parametrize("rank,world,accum", [(0, 1, 2), (1, 2, 1)])
def test_prefetch_gives_the_same_batches_and_states(tmp_path, rank, world, accum):
    pattern = shards(tmp_path, [300, 211, 157])  # batches cross shard ends and wrap around
    requests = [(64, 8, accum)] * 40
    sync = DistributedTokenLoader(pattern, rank, world)
    fast = DistributedTokenLoader(pattern, rank, world, prefetch=True)
    try:
        expected, got = batches(sync, requests), batches(fast, requests)
    finally:
        fast.close()
    assert len(got) == 40
    for (x, y, state), (fx, fy, fstate) in zip(expected, got):
        assert torch.equal(x, fx) and torch.equal(y, fy) and fx.dtype == torch.int64
        assert state == fstate  # the state after each batch handed out, not after the prefetched one


def test_prefetch_resume_and_shape_change_are_exact(tmp_path):
    pattern = shards(tmp_path, [97, 64, 130])
    requests = [(32, 8, 1)] * 6 + [(48, 8, 2)] * 5 + [(32, 4, 1)] * 4  # the batch shape changes twice
    expected = batches(DistributedTokenLoader(pattern), requests)
    fast = DistributedTokenLoader(pattern, prefetch=True)
    try:
        got = batches(fast, requests[:8])
        state = fast.state_dict()  # mid-run checkpoint while the thread is already ahead
        got += batches(fast, requests[8:])
        resumed = DistributedTokenLoader(pattern, prefetch=True)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        again = batches(resumed, requests[8:])
        fast.load_state_dict(state)  # rewinding a running prefetcher
        rewound = batches(fast, requests[8:])
    finally:
        fast.close()
        resumed.close()
    for run in (got, expected[:8] + again, expected[:8] + rewound):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
                   for a, b in zip(expected, run))


def test_prefetch_raises_at_the_same_batch_as_the_synchronous_path(tmp_path):
    write_shard(tmp_path / "s_000000.bin", np.arange(40) % 50)
    write_shard(tmp_path / "s_000001.bin", np.full(40, 99))  # out of range for vocab_size=50
    pattern = str(tmp_path / "s_*.bin")
    for prefetch in (False, True):
        loader = DistributedTokenLoader(pattern, vocab_size=50, prefetch=prefetch)
        try:
            for _ in range(4):  # 4 x 9 tokens stay in the first shard
                loader.next_batch(8, 8, 1)
            with pytest.raises(ShardError, match="model.vocab_size=50"):
                loader.next_batch(8, 8, 1)
        finally:
            loader.close()


def test_pinned_memory_needs_cuda(tmp_path):
    pattern = shards(tmp_path, [50])
    with pytest.raises(ValueError, match="pin_memory=True stages batches for a CUDA device"):
        DistributedTokenLoader(pattern, prefetch=True, pin_memory=True)
    assert not DistributedTokenLoader(pattern, prefetch=True).pin_memory


def test_training_with_prefetch_resumes_exactly_like_the_synchronous_loader(tmp_path):
    """Warmup restore, checkpoints and resume go through the prefetching loader's state_dict."""
    from pgolf.runs import read_metrics
    from pgolf.train.run import run_training
    from tests.train.test_train import tiny_config

    common = ("train.iterations=6", "train.checkpoint_every=3", "train.val_loss_every=0", "train.warmdown_iters=3")
    sync = run_training(tiny_config(tmp_path, *common, "run.run_id=sync"), console=False)
    killed = run_training(tiny_config(tmp_path, *common, "data.prefetch=on", "run.run_id=fast"), interrupt_at_step=4,
                          console=False)
    assert killed["status"] == "interrupted"
    resumed = run_training(tiny_config(tmp_path), resume=str(tmp_path / "runs" / "fast"), console=False)
    assert "prefetch: True" in (tmp_path / "runs" / "fast" / "train.log").read_text()
    losses = [{e["step"]: e["train_loss"] for e in read_metrics(tmp_path / "runs" / run) if e["event"] == "train"}
              for run in ("sync", "fast")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert resumed["pre_quant"]["val_loss"] == sync["pre_quant"]["val_loss"]
