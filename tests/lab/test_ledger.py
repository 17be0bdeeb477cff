"""The results ledger: rows written by runs, concurrent writers, killed runs, config hashes."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from pgolf.lab import ledger as ledger_mod
from pgolf.cli import main as cli_main
from pgolf.config import Config
from pgolf.config.resolve import resolve_config
from pgolf.lab.ledger import Ledger, LedgerHooks, config_diff, config_hash, ensure_run, git_commit, ledger_path
from pgolf.train.run import run_training
from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides, tiny_config

FAST = ("model.num_layers=2", "train.iterations=3", "train.val_loss_every=0", "train.warmup_steps=0")


def test_config_hash_ignores_labels_and_seed_but_not_the_experiment():
    base = Config().to_dict()

    def with_(**changes):
        d = json.loads(json.dumps(base))
        for key, value in changes.items():
            section, name = key.split("__")
            d[section][name] = value
        return d

    h = config_hash(base)
    assert config_hash(with_(train__seed=42, run__group="g", run__run_id="x", run__name="n", run__runs_dir="/r",
                             train__train_log_every=1, train__checkpoint_every=5)) == h
    assert config_hash(with_(model__num_layers=11)) != h
    assert config_hash(with_(train__iterations=5)) != config_hash(with_(train__iterations=6))
    # A run saved before a switch existed hashes like one saved after, with the switch at its default.
    older = json.loads(json.dumps(base))
    del older["qat"]["enabled"]
    assert config_hash(older) == h


def test_config_diff_is_against_the_preset():
    cfg, _ = resolve_config("smoke", ["model.num_layers=2", "train.seed=7", "run.group=g"], env={})
    assert config_diff(cfg.to_dict(), "smoke") == {"model.num_layers": 2}
    assert config_diff(cfg.to_dict(), None)["model.vocab_size"] == 260  # without a preset: against the defaults


def test_git_commit_never_fails(monkeypatch):
    assert git_commit() == "unknown" or len(git_commit()) == 40

    def broken(*args, **kwargs):
        raise OSError("no git here")

    git_commit.cache_clear()
    monkeypatch.setattr(ledger_mod.subprocess, "run", broken)
    try:
        assert git_commit() == "unknown"
    finally:
        git_commit.cache_clear()


def test_a_run_records_itself(tmp_path, one_cpu_thread, capsys):
    summary = run_training(tiny_config(tmp_path, *FAST, "run.group=grp", "train.seed=5"), console=False, hooks=LedgerHooks())
    rows = Ledger(tmp_path / "runs").rows()
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == summary["run_id"] and row["status"] == "done" and row["group_id"] == "grp"
    assert row["seed"] == 5 and row["steps"] == 3 and row["device"] == "cpu" and row["world_size"] == 1
    assert row["val_bpb"] == summary["roundtrip"]["val_bpb"] and row["val_loss"] == summary["roundtrip"]["val_loss"]
    assert row["pre_val_bpb"] == summary["pre_quant"]["val_bpb"]
    assert row["total_bytes"] == summary["size"]["total_bytes"]
    assert row["artifact_bytes"] == (tmp_path / "runs" / row["run_id"] / "model.pgolf").stat().st_size
    assert row["pid"] == os.getpid() and row["git_commit"]
    assert json.loads(row["config_diff"])["model.num_layers"] == 2 and "train.seed" not in row["config_diff"]
    assert Ledger(tmp_path / "runs").rows("other") == []

    # A sliding evaluation over the same targets as the roundtrip is recorded; a prefix is not.
    run_dir = tmp_path / "runs" / row["run_id"]
    assert cli_main(["eval", str(run_dir), "--stride", "32", "--max-tokens", "128"]) == 0
    assert Ledger(tmp_path / "runs").get(row["run_id"])["sliding_val_bpb"] is None
    capsys.readouterr()
    assert cli_main(["eval", str(run_dir), "--stride", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stored = Ledger(tmp_path / "runs").get(row["run_id"])
    assert stored["sliding_val_bpb"] == result["val_bpb"] and stored["sliding_stride"] == 32

    assert cli_main(["ledger", "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in listed] == [row["run_id"]]
    assert cli_main(["ledger", "--runs-dir", str(tmp_path / "runs"), "--group", "grp"]) == 0
    out = capsys.readouterr().out
    assert row["run_id"] in out and "done" in out and "val_bpb" in out


def test_ledger_is_rebuilt_from_run_directories(tmp_path, one_cpu_thread, capsys):
    summary = run_training(tiny_config(tmp_path, *FAST), console=False, hooks=LedgerHooks())
    ledger_path(tmp_path / "runs").unlink()
    run_dir = tmp_path / "runs" / summary["run_id"]
    row = ensure_run(run_dir)
    assert row["status"] == "done" and row["val_bpb"] == summary["roundtrip"]["val_bpb"]
    ledger_path(tmp_path / "runs").unlink()
    assert cli_main(["ledger", "--runs-dir", str(tmp_path / "runs"), "--scan"]) == 0
    assert summary["run_id"] in capsys.readouterr().out


def test_writing_the_ledger_never_fails_a_run(tmp_path, one_cpu_thread, capsys):
    ledger_path(tmp_path / "runs").mkdir(parents=True)  # a directory where the database should be
    summary = run_training(tiny_config(tmp_path, *FAST), console=False, hooks=LedgerHooks())
    assert summary["status"] == "done"
    assert "could not update the run ledger" in capsys.readouterr().err


def _write_rows(runs_dir: str, writer: int, count: int) -> None:
    ledger = Ledger(runs_dir)
    for i in range(count):
        run_id = f"w{writer}-{i:03d}"
        ledger.upsert(run_id, status="running", group_id=f"g{writer}", seed=i, started_at=f"{writer}-{i:03d}")
        ledger.upsert(run_id, status="done", val_bpb=writer + i / 1000, total_bytes=writer * 1000 + i)


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_rows, args=(str(tmp_path), w, 60)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    rows = Ledger(tmp_path).rows()
    assert len(rows) == 120
    for r in rows:
        writer, i = int(r["run_id"][1]), int(r["run_id"][3:])
        assert r["status"] == "done" and r["group_id"] == f"g{writer}" and r["seed"] == i
        assert r["val_bpb"] == writer + i / 1000 and r["total_bytes"] == writer * 1000 + i


def test_a_killed_run_is_reported_as_killed(tmp_path):
    overrides = synthetic_overrides(tmp_path) + TINY_MODEL + TINY_TRAIN + [
        "model.num_layers=2", "train.iterations=1000000", "train.val_loss_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("SEED", "ITERATIONS", "DATA_PATH")}
    proc = subprocess.Popen([sys.executable, "-m", "pgolf", "train", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = Ledger(tmp_path / "runs")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            rows = ledger.rows() if ledger.path.exists() else []
            if rows and rows[0]["status"] == "running":
                break
            assert proc.poll() is None, "the training process ended early"
            time.sleep(0.2)
        else:
            pytest.fail("the run never registered as running")
        assert rows[0]["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    row = ledger.rows()[0]
    assert row["status"] == "killed" and "killed" in row["error"]
    # Stored, not only reported: a raw read sees it too.
    assert ledger.get(row["run_id"])["status"] == "killed"


def test_a_stale_running_row_takes_the_outcome_of_summary_json(tmp_path, one_cpu_thread):
    summary = run_training(tiny_config(tmp_path, *FAST), console=False, hooks=LedgerHooks())
    ledger = Ledger(tmp_path / "runs")
    # As if the final ledger write had been lost: the row still says running, from a process long gone.
    ledger.upsert(summary["run_id"], status="running", pid=2 ** 22 + 12345, val_bpb=None)
    row = ledger.rows()[0]
    assert row["status"] == "done" and row["val_bpb"] == summary["roundtrip"]["val_bpb"]
