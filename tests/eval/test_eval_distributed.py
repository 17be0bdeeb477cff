"""`pgolf eval` under torchrun: 2 gloo processes give the single-process scores and receipts.

Marked slow: it launches four torchrun jobs. The default suite covers 2-process sums with a
spawned gloo group in test_sliding.py."""

import json
import os
import subprocess
import sys

import pytest

from pgolf.eval.audit import audit_file
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaldist")
    summary = run_training(tiny_config(tmp, "train.iterations=6", "train.val_loss_every=0",
                                       "data.synthetic_val_tokens=2049"), console=False)
    return tmp / "runs" / summary["run_id"]


def _eval(run_dir, receipt, *extra, nproc=1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "pgolf", "eval", str(run_dir), "--json",
                                                           "--receipt", str(receipt), *extra]
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=run_dir.parent.parent).stdout
    return json.loads(out[out.index("{"):])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--stride", "16"], ["--stride", "32", "--ttt", "--ttt-chunk", "512",
                                                        "--ttt-epochs", "1", "--ttt-batch", "4"]])
def test_two_processes_match_one(trained_run, tmp_path, mode):
    one = _eval(trained_run, tmp_path / "one.json", *mode)
    two = _eval(trained_run, tmp_path / "two.json", *mode, nproc=2)
    assert two["tokens"] == one["tokens"] == 2048 and two["bytes"] == one["bytes"]
    assert two["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-5)
    assert audit_file(tmp_path / "two.json").updates == audit_file(tmp_path / "one.json").updates
