"""Gradient clipping with 2 gloo processes (pgolf.train.clipping and Trainer.train_step):
train.grad_clip_mode=per_rank clips each rank's local gradient then averages, synced clips the
average; Parallel Muon clips as plain Muon does; optim.parallel_muon_bf16 communicates and keeps
the momentum in bf16."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pgolf.train.parallel_muon as parallel_muon_module
from pgolf.runs import RunLogger
from pgolf.runtime.distributed import DistInfo
from pgolf.train.parallel_muon import ParallelMuon
from pgolf.train.trainer import Trainer, prepare_data
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WORLD = 2
CLIP = 0.3  # below every rank's gradient norm and the averaged one's: the clip acts in every mode
PM = ("optim.parallel_muon=on",)
PER_RANK = ("train.grad_clip_mode=per_rank",)
RUNS = {"synced": (), "per_rank": PER_RANK, "pm_synced": PM, "pm_per_rank": PM + PER_RANK,
        "pm_bf16": PM + ("optim.parallel_muon_bf16=true",)}
STEPS = 2


def _config(tmp, extra=()):
    return tiny_config(Path(tmp), f"train.grad_clip_norm={CLIP}", "train.warmup_steps=0", *extra)


def _local_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This rank's gradient of its next step's micro-batches, without DDP; the stream is rewound."""
    state, accum, t = trainer.loader.state_dict(), trainer.info.grad_accum_steps, trainer.cfg.train
    for _ in range(accum):
        x, y = trainer.loader.next_batch(t.train_batch_tokens, t.train_seq_len, accum)
        (trainer.base_model(x, y) / accum).backward()
    grads = {n: p.grad.clone() for n, p in trainer.base_model.named_parameters() if p.grad is not None}
    trainer.base_model.zero_grad(set_to_none=True)
    trainer.loader.load_state_dict(state)
    return grads


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    comm_dtypes: list[tuple[str, torch.dtype]] = []
    for name, fn in (("reduce_scatter", "_reduce_scatter"), ("all_gather", "_all_gather")):
        real = getattr(parallel_muon_module, fn)
        setattr(parallel_muon_module, fn,
                lambda out, inp, *a, _real=real, _name=name, **k: comm_dtypes.append((_name, inp.dtype)) or
                _real(out, inp, *a, **k))
    try:
        info = DistInfo(rank, WORLD, rank, torch.device("cpu"), True)
        logger = RunLogger(None, enabled=False)
        data = prepare_data(_config(tmp), info, logger)
        out = {}
        for run, extra in RUNS.items():
            comm_dtypes.clear()
            trainer = Trainer(_config(tmp, extra), info, data, logger)
            start = {n: t.clone() for n, t in trainer.base_model.state_dict().items()}
            local, stepped = _local_grads(trainer), {}
            real_step = trainer.optimizers.step

            def step():  # the gradients the optimizers get (the matrices' are local under Parallel Muon)
                if not stepped:
                    stepped.update({n: p.grad.clone() for n, p in trainer.base_model.named_parameters()})
                real_step()

            trainer.optimizers.step = step
            first = None
            for _ in range(STEPS):
                trainer.train_step(1.0)
                trainer.step += 1
                first = first or {n: t.clone() for n, t in trainer.base_model.state_dict().items()}
            muon = trainer.optimizers.muon
            out[run] = {"local": local, "stepped": stepped, "muon": type(muon).__name__, "start": start, "first": first,
                        "weights": {n: t.clone() for n, t in trainer.base_model.state_dict().items()},
                        "momentum": sorted({str(s["momentum_buffer"].dtype) for s in muon.state.values()}),
                        "comm": sorted({(n, str(d)) for n, d in comm_dtypes})}
        torch.save(out, f"{tmp}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clipping")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _clipped(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert norm > CLIP  # the clip acts
    return {n: g * (CLIP / (norm + 1e-6)) for n, g in grads.items()}


def _mean(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(d[n] for d in dicts) / len(dicts) for n in dicts[0]}


def _close(a: dict, b: dict, atol: float) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=atol, rtol=0) for n in a)


def test_synced_clips_the_average_and_per_rank_averages_the_clipped(runs):
    locals_ = [out["synced"]["local"] for out in runs]
    assert not _close(locals_[0], locals_[1], 1e-4)  # the ranks saw different batches
    clip_of_mean = _clipped(_mean(locals_))
    mean_of_clips = _mean([_clipped(g) for g in locals_])
    assert not _close(clip_of_mean, mean_of_clips, 1e-4)  # the two modes differ here
    for out in runs:
        assert _close(out["synced"]["stepped"], clip_of_mean, 1e-6)
        assert _close(out["per_rank"]["stepped"], mean_of_clips, 1e-6)
    assert not _close(runs[0]["synced"]["weights"], runs[0]["per_rank"]["weights"], 1e-5)


def test_parallel_muon_clips_as_plain_muon(runs):
    for out in runs:
        assert out["pm_synced"]["muon"] == "ParallelMuon" and out["synced"]["muon"] == "Muon"
        for mode in ("synced", "per_rank"):
            assert _close(out[f"pm_{mode}"]["weights"], out[mode]["weights"], 2e-6), mode
    assert all(torch.equal(runs[0]["pm_synced"]["weights"][n], t) for n, t in runs[1]["pm_synced"]["weights"].items())


def test_parallel_muon_bf16_communicates_and_keeps_momentum_in_bf16(runs):
    for out in runs:
        fp32, bf16 = out["pm_synced"], out["pm_bf16"]
        assert fp32["momentum"] == ["torch.float32"] and bf16["momentum"] == ["torch.bfloat16"]
        assert fp32["comm"] == [("all_gather", "torch.float32"), ("reduce_scatter", "torch.float32")]  # CPU: fp32 NS
        assert bf16["comm"] == [("all_gather", "torch.bfloat16"), ("reduce_scatter", "torch.bfloat16")]
        # The first step moved the matrices as the fp32 run did, to bf16's precision, not identically:
        # rounding these nearly low-rank gradients to bf16 alone moves their Newton-Schulz output 4-7 %.
        matrices = [n for n, t in fp32["first"].items() if n.startswith("blocks.") and t.ndim == 2]
        move = torch.cat([(fp32["first"][n] - fp32["start"][n]).flatten() for n in matrices])
        gap = torch.cat([(bf16["first"][n] - fp32["first"][n]).flatten() for n in matrices])
        assert all(torch.equal(bf16["start"][n], fp32["start"][n]) for n in matrices)
        assert 0 < gap.norm() < 0.1 * move.norm()
    assert all(torch.equal(runs[0]["pm_bf16"]["weights"][n], t) for n, t in runs[1]["pm_bf16"]["weights"].items())


def test_bf16_momentum_survives_a_checkpoint_reload():
    """Optimizer.load_state_dict casts state to the parameter's dtype; the bf16 momentum comes back
    bf16 with the same values (one process: ParallelMuon steps as Muon)."""
    p = torch.nn.Parameter(torch.randn(8, 12, generator=torch.Generator().manual_seed(0)))
    opt = ParallelMuon([p], lr=0.05, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, bf16=True)
    p.grad = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    opt.step()
    saved = opt.state[p]["momentum_buffer"].clone()
    assert saved.dtype == torch.bfloat16
    fresh = ParallelMuon([p], lr=0.05, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, bf16=True)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["momentum_buffer"].dtype == torch.float32  # torch's cast
    assert torch.equal(fresh.momentum_buffer(p), saved)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["synced", "per_rank"])
def test_pgolf_train_two_processes_clips_with_parallel_muon_bf16(tmp_path, mode):
    import json
    import os
    import subprocess
    import sys

    from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, "-m", "pgolf", "train", *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN,
                    "train.iterations=4", "train.val_loss_every=0", f"train.grad_clip_norm={CLIP}",
                    f"train.grad_clip_mode={mode}", *PM, "optim.parallel_muon_bf16=true", "run.run_id=two",
                    "--nproc", "2"], check=True, env=env)
    assert json.loads((tmp_path / "runs/two/summary.json").read_text())["status"] == "done"
    assert "speed: muon ParallelMuon" in (tmp_path / "runs/two/train.log").read_text()
