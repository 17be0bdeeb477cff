"""Parallel Muon (pgolf.train.parallel_muon): 2 gloo processes equal single-process Muon."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.config import ConfigError, ModelConfig
from pgolf.config.resolve import resolve_config
from pgolf.model.gpt import GPT
from pgolf.model.roles import Role, param_roles
from pgolf.train.muon import Muon
from pgolf.train.optim import use_parallel_muon
from pgolf.train.parallel_muon import ParallelMuon, ddp_ignore, plan_buckets

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WORLD = 2
# Square, wide, tall (joins the wide bank of its transpose) and an odd count (a padded bucket).
SHAPES = [(16, 16), (8, 24), (24, 8), (16, 16), (8, 24), (16, 16), (12, 20)]
STEPS = 4
TINY = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def start_params():
    return [torch.nn.Parameter(randn(*s, seed=i)) for i, s in enumerate(SHAPES)]


def local_grad(rank, step, index):
    return randn(*SHAPES[index], seed=1000 * rank + 10 * step + index)


OPT = dict(lr=0.05, momentum=0.9, backend_steps=5, ns_dtype=torch.float32, weight_decay=0.1)
VARIANTS = dict(ns="polar_express", row_norm=True)  # the 1.06108 record's Muon (tests/train/test_muon_variants.py)


# --- bucket plan ---------------------------------------------------------------------------

def test_plan_buckets_covers_every_matrix_once_with_padding():
    params = start_params()
    buckets = plan_buckets(params, WORLD)
    assert all(len(b.params) == WORLD == len(b.transposed) for b in buckets)
    placed = [p for b in buckets for p in b.params if p is not None]
    assert sorted(map(id, placed)) == sorted(map(id, params))
    for b in buckets:
        assert b.shape[0] <= b.shape[1]
        for p, t in zip(b.params, b.transposed):
            if p is not None:
                assert (p.shape[::-1] if t else tuple(p.shape)) == b.shape and t == (p.shape[0] > p.shape[1])
    # Backward order (last parameter first): full buckets as they fill, then the padded remainders.
    index = {id(p): i for i, p in enumerate(params)}
    layout = [(b.shape, [None if p is None else index[id(p)] for p in b.params]) for b in buckets]
    assert layout == [((16, 16), [5, 3]), ((8, 24), [4, 2]), ((12, 20), [6, None]), ((8, 24), [1, None]),
                      ((16, 16), [0, None])]
    assert [b.transposed for b in buckets][1] == [False, True]  # the 24x8 matrix rides as its transpose
    assert len(plan_buckets(params, 1)) == len(params)


def test_single_process_parallel_muon_is_muon():
    a, b = start_params(), start_params()
    opt_a, opt_b = Muon(a, **OPT), ParallelMuon(b, **OPT)
    for step in range(2):
        for i, (pa, pb) in enumerate(zip(a, b)):
            pa.grad = local_grad(0, step, i)
            pb.grad = local_grad(0, step, i)
        opt_b.arm_backward_sync(True)  # no effect with one process
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))


# --- 2 gloo processes ----------------------------------------------------------------------

def _init(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))


def _optimizer_run(rank: int, tmp: str, nesterov: bool, **variant) -> None:
    params = start_params()
    opt = ParallelMuon(params, nesterov=nesterov, **OPT, **variant)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = local_grad(rank, step, i)
        opt.step()
    owned = sorted(i for i, p in enumerate(params) if p in opt.state)
    torch.save({"params": [p.detach() for p in params], "owned": owned},
               f"{tmp}/nesterov{nesterov}{'_variants' * bool(variant)}_rank{rank}.pt")


def _worker(rank: int, tmp: str) -> None:
    """Both 2-process experiments in one spawn (starting processes is the slow part)."""
    _init(rank, tmp)
    try:
        for nesterov in (True, False):
            _optimizer_run(rank, tmp, nesterov)
        _optimizer_run(rank, tmp, True, **VARIANTS)
        _ddp_run(rank, tmp)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel_muon")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return tmp


@pytest.mark.parametrize("nesterov, variant", [(True, {}), (False, {}), (True, VARIANTS)],
                         ids=["nesterov", "plain", "polar_express+row_norm"])
def test_two_processes_equal_single_process_muon_on_averaged_gradients(two_process_results, nesterov, variant):
    outs = [torch.load(two_process_results / f"nesterov{nesterov}{'_variants' * bool(variant)}_rank{r}.pt")
            for r in range(WORLD)]
    params = start_params()
    reference = Muon(params, nesterov=nesterov, **OPT, **variant)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = sum(local_grad(r, step, i) for r in range(WORLD)) / WORLD
        reference.step()
    for i, p in enumerate(params):
        assert torch.equal(outs[0]["params"][i], outs[1]["params"][i])  # ranks hold identical weights
        assert torch.allclose(outs[0]["params"][i], p.detach(), atol=2e-6, rtol=0), i
        assert not torch.allclose(p.detach(), start_params()[i], atol=1e-3)
    # Each matrix's momentum lives on exactly one rank: the work was split.
    assert sorted(outs[0]["owned"] + outs[1]["owned"]) == list(range(len(SHAPES)))
    assert outs[0]["owned"] and outs[1]["owned"]


def _tiny_model():
    torch.manual_seed(0)
    model = GPT(TINY)
    with torch.no_grad():  # zero-initialised projections would give zero gradients to half the matrices
        for name, p in model.named_parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=0.05)
    return model


def _matrices(model):
    roles = param_roles(model)
    return [p for name, p in model.named_parameters() if roles[name] is Role.MATRIX]


def _batches(rank: int, micro: int):
    gen = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randint(0, 64, (2, 16), generator=gen), torch.randint(0, 64, (2, 16), generator=gen)


MICRO = 2


def _ddp_run(rank: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _tiny_model()
    matrices = _matrices(model)
    opt = ParallelMuon(matrices, **OPT)
    ignored = ddp_ignore(model, matrices)
    ddp = DDP(model, broadcast_buffers=False)
    launched_in_backward = []
    for step in range(2):
        for micro in range(MICRO):
            ddp.require_backward_grad_sync = micro == MICRO - 1
            opt.arm_backward_sync(micro == MICRO - 1)
            x, y = _batches(rank, 10 * step + micro)
            (ddp(x, y) / MICRO).backward()
        launched_in_backward.append(opt.launched_syncs)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        model.zero_grad(set_to_none=True)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "ignored": ignored,
                "launched": launched_in_backward, "buckets": len(opt.buckets(0)), "grads": grads},
               f"{tmp}/ddp{rank}.pt")


def test_ddp_with_hooks_equals_single_process(two_process_results):
    """DDP leaves the matrices to Parallel Muon, whose reduce-scatters start inside the backward;
    the weights equal one process stepping Muon on the gradient averaged over both ranks' batches."""
    outs = [torch.load(two_process_results / f"ddp{r}.pt") for r in range(WORLD)]
    model = _tiny_model()
    matrices = _matrices(model)
    matrix_names = {n for n, p in model.named_parameters() if any(p is m for m in matrices)}
    assert set(outs[0]["ignored"]) == matrix_names and len(matrix_names) == 12
    assert outs[0]["launched"] == [outs[0]["buckets"]] * 2  # every bucket launched from the hooks
    # DDP averaged the other parameters' gradients but left the matrices' local.
    g0, g1 = outs[0]["grads"], outs[1]["grads"]
    assert torch.allclose(g0["tok_emb.weight"], g1["tok_emb.weight"], atol=1e-7)
    assert all(not torch.allclose(g0[n], g1[n]) for n in matrix_names)

    reference = Muon(matrices, **OPT)
    for step in range(2):
        for rank in range(WORLD):
            for micro in range(MICRO):
                x, y = _batches(rank, 10 * step + micro)
                (model(x, y) / (MICRO * WORLD)).backward()
        reference.step()
        model.zero_grad(set_to_none=True)
    start = _tiny_model()
    for name, p in model.named_parameters():
        for out in outs:
            assert torch.allclose(out["params"][name], p.detach(), atol=2e-6, rtol=0), name
        if name in matrix_names:
            assert not torch.allclose(p.detach(), start.get_parameter(name), atol=1e-4), name


# --- switch --------------------------------------------------------------------------------

def test_parallel_muon_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_parallel_muon("auto", cuda, 8) and not use_parallel_muon("auto", cpu, 2)
    assert not use_parallel_muon("auto", cuda, 1) and not use_parallel_muon("on", cuda, 1)
    assert use_parallel_muon("on", cpu, 2) and not use_parallel_muon("off", cuda, 8)
    with pytest.raises(ConfigError, match="optim.parallel_muon must be auto, on or off"):
        resolve_config(None, ["optim.parallel_muon=yes"], env={})
    # Clipping works with it (tests/train/test_clipping.py); bf16 needs it.
    resolve_config(None, ["optim.parallel_muon=on", "train.grad_clip_norm=1.0"], env={})
    with pytest.raises(ConfigError, match="optim.parallel_muon_bf16=true needs optim.parallel_muon=auto or on"):
        resolve_config(None, ["optim.parallel_muon_bf16=true"], env={})


# --- the training command ------------------------------------------------------------------

@pytest.mark.slow
def test_pgolf_train_two_processes_with_parallel_muon_matches_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides

    base = ["train", *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN, "train.iterations=4",
            "train.val_loss_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, "-m", "pgolf", *base, "run.run_id=one"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "pgolf", *base, "run.run_id=two", "optim.parallel_muon=on",
                    "--nproc", "2"], check=True, env=env)
    one = json.loads((tmp_path / "runs/one/summary.json").read_text())
    two = json.loads((tmp_path / "runs/two/summary.json").read_text())
    assert "speed: muon ParallelMuon" in (tmp_path / "runs/two/train.log").read_text()
    assert two["status"] == "done"
    assert two["pre_quant"]["val_loss"] == pytest.approx(one["pre_quant"]["val_loss"], abs=1e-4)
