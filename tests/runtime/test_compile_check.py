"""The recompilation watch (pgolf.runtime.compile_check) and its report in the training log."""

from __future__ import annotations

import pytest
import torch

from pgolf.runtime.compile_check import RecompileWatch
from pgolf.runs import read_metrics
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config


def test_watch_counts_graphs_built_during_a_step():
    fn = torch.compile(lambda x: x.sin() + 1, backend="eager", dynamic=False)
    watch = RecompileWatch(enabled=True)
    counts = []
    for n in (3, 3, 5, 5):
        watch.before_step()
        fn(torch.ones(n))
        counts.append(watch.after_step())
    assert counts == [1, 0, 1, 0] and watch.total == 2
    off = RecompileWatch(enabled=False)
    off.before_step()
    torch.compile(lambda x: x.cos(), backend="eager")(torch.ones(2))
    assert off.after_step() == 0


@pytest.mark.slow  # dynamo traces the model and the Newton-Schulz shapes twice: ~50 s on a busy 2-core CPU
def test_training_log_names_steps_that_compiled(tmp_path, monkeypatch):
    # The CUDA path's torch.compile, with dynamo's eager backend (no C++ toolchain needed on CPU).
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    cold = run_training(tiny_config(tmp_path, "train.iterations=2", "train.val_loss_every=0", "train.compile=on",
                                    "train.warmup_steps=0", "run.run_id=cold"), console=False)
    events = [e for e in read_metrics(tmp_path / "runs" / cold["run_id"]) if e["event"] == "recompile"]
    assert [e["step"] for e in events] == [1] and events[0]["graphs"] >= 1  # no warmup: step 1 compiled
    warm = run_training(tiny_config(tmp_path, "train.iterations=2", "train.val_loss_every=0", "train.compile=on",
                                    "train.warmup_steps=1", "run.run_id=warm"), console=False)
    assert not [e for e in read_metrics(tmp_path / "runs" / warm["run_id"]) if e["event"] == "recompile"]
    assert "recompile:" not in (tmp_path / "runs" / "warm" / "train.log").read_text()
