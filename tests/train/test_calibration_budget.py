"""The export's calibration (GPTQ / allocator Hessians) and the wall-clock budget: the schedule
anneals by the budget the stop uses, training data is read only inside the budget by default,
self-generated calibration reads none, and the summary says which happened."""

from __future__ import annotations

import time

import pytest
import torch

import pgolf.compress.gptq as gptq
from pgolf.config import ConfigError
from pgolf.config.resolve import resolve_config
from pgolf.model.gpt import GPT
from pgolf.runs import read_metrics
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CAPPED = ["train.iterations=100000", "train.max_wallclock_seconds=3", "train.val_loss_every=0",
          "train.warmdown_frac=0.5", "export.gptq=true", "run.run_id=r"]


def test_the_warmdown_ends_where_the_reserve_stops_training(tmp_path):
    summary = run_training(tiny_config(tmp_path, *CAPPED, "export.gptq_reserve_seconds=1.5"), console=False)
    assert summary["stop_reason"] == "wallclock_cap" and 1500 <= summary["train_time_ms"] < 2500
    last = [e for e in read_metrics(tmp_path / "runs" / "r") if e["event"] == "train"][-1]
    # Annealing toward 0 at 1.5 s; the full 3 s cap's schedule would still be at 1.0 there. How far
    # it got depends on the step time (a loaded machine makes the last step start earlier).
    assert last["lr_scale"] < 1.0


def test_by_default_training_data_is_read_only_inside_the_budget(tmp_path, monkeypatch):
    """Instrumented calibration: the export's read of the training shards and its Hessians end
    within train.max_wallclock_seconds of training-clock time (training stopped early by a
    reserve measured before training)."""
    calls = []
    real_batches, real_hessians = gptq.calibration_batches, gptq.collect_hessians

    def batches(*args, **kwargs):
        calls.append([time.perf_counter()])
        return real_batches(*args, **kwargs)

    def hessians(*args, **kwargs):
        out = real_hessians(*args, **kwargs)
        calls[-1].append(time.perf_counter())
        return out

    monkeypatch.setattr(gptq, "calibration_batches", batches)
    monkeypatch.setattr(gptq, "collect_hessians", hessians)
    summary = run_training(tiny_config(tmp_path, *CAPPED), console=False)
    assert summary["status"] == "done" and summary["stop_reason"] == "wallclock_cap"
    start, end = calls[-1]
    assert summary["train_time_ms"] / 1000 + (end - start) <= 3.0
    assert len(calls) == 2  # the timing before training, then the export's
    record = summary["calibration"]
    assert record["source"] == "train_reserved" and record["training_data_after_budget"] is False
    assert record["reserve"].startswith("measured") and record["reserve_seconds"] > 0
    log = (tmp_path / "runs" / "r" / "train.log").read_text()
    assert "calibration reserve: " in log and "(reserve " in log and "measured): inside the 3 s budget" in log


def test_self_generated_calibration_reads_no_training_data(monkeypatch):
    cfg, _ = resolve_config(None, ["model.num_layers=2", "model.model_dim=32", "model.num_heads=2",
                                   "model.num_kv_heads=1", "model.vocab_size=64", "train.train_seq_len=16",
                                   "export.gptq=true", "export.gptq_seqs=5",
                                   "export.gptq_calibration=self_generated"], env={})
    torch.manual_seed(0)
    model = GPT(cfg.model)

    def refuse(*args, **kwargs):
        raise AssertionError("self-generated calibration read the training data")

    seen = []
    real_hessians = gptq.collect_hessians
    monkeypatch.setattr(gptq, "calibration_batches", refuse)
    monkeypatch.setattr(gptq.TokenStream, "take", refuse)
    monkeypatch.setattr(gptq, "collect_hessians", lambda m, b, **kw: seen.append(b) or real_hessians(m, b, **kw))
    from pgolf.compress.policy import plan_export

    plan = plan_export(model, cfg, [], torch.device("cpu"), code_bytes=0)
    assert any(line.startswith("calibration: 5 self-generated sequences") for line in plan.lines)
    x = torch.cat([x for x, _ in seen[0]])
    y = torch.cat([y for _, y in seen[0]])
    assert x.shape == (5, 16) and torch.equal(x[:, 1:], y[:, :-1]) and 0 <= int(x.min()) <= int(x.max()) < 64
    plan_export(model, cfg, [], torch.device("cpu"), code_bytes=0)
    assert torch.equal(torch.cat([x for x, _ in seen[1]]), x)  # seeded: the same text every time


@pytest.mark.parametrize("source, train_s, seconds, cap, after", [
    ("train_reserved", 595.0, 2.0, 600.0, False),
    ("train_reserved", 599.0, 2.0, 600.0, True),  # a reserve too small: said, never hidden
    ("train_after_budget", 600.0, 2.0, 600.0, True),
    ("train_after_budget", 100.0, 2.0, 600.0, False),  # stopped by iterations long before the cap
    ("self_generated", 600.0, 30.0, 600.0, False),
    ("train_reserved", 900.0, 2.0, 0.0, None),  # no wall-clock budget
])
def test_the_calibration_record(source, train_s, seconds, cap, after):
    from pgolf.train.calibration import calibration_record

    cfg, _ = resolve_config(None, ["export.gptq=true", f"export.gptq_calibration={source}",
                                   f"train.max_wallclock_seconds={cap}"], env={})
    record = calibration_record(cfg, 1000 * train_s, seconds, 4.0)
    assert record["source"] == source and record["training_data_after_budget"] is after


def test_calibration_source_is_checked():
    with pytest.raises(ConfigError, match="export.gptq_calibration must be one of train_reserved, self_generated, "
                                          "train_after_budget, got 'val'"):
        resolve_config(None, ["export.gptq=true", "export.gptq_calibration=val"], env={})


def test_a_budget_too_short_for_the_measured_reserve_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="leaves no training in train.max_wallclock_seconds=0.5"):
        run_training(tiny_config(tmp_path, *CAPPED, "train.max_wallclock_seconds=0.5"), console=False)
