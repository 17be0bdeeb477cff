"""Controlling a run from outside: the run lock, SIGINT/SIGTERM with a checkpoint at the step
reached, and checkpoint retention."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pgolf.config import ConfigError
from pgolf.config.checks import validate
from pgolf.runs import RunDir, RunError, read_metrics
from pgolf.train.run import Trainer, run_training
from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides, tiny_config

REPO = Path(__file__).resolve().parents[2]
EXACT = ("train.warmdown_iters=4", "train.val_loss_every=0")


def _ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in RunDir(run_dir).checkpoints.iterdir())


def _weights(run_dir: Path, step: int) -> dict:
    return torch.load(RunDir(run_dir).checkpoints / f"step_{step:07d}.pt", weights_only=True)["model"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- one writer per run directory -------------------------------------------------------------

def test_resume_is_refused_while_another_process_trains_the_run(tmp_path):
    common = ("train.iterations=4", "train.checkpoint_every=2", *EXACT, "run.run_id=busy")
    run_training(tiny_config(tmp_path, *common), interrupt_at_step=2, console=False)
    run_dir = tmp_path / "runs" / "busy"
    assert not RunDir(run_dir).lock.exists()  # released when the run stopped
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        owner = {"pid": other.pid, "host": socket.gethostname(), "pid_start": "",  # unknown: the pid alone
                 "acquired_at": "2025-01-01T00:00:00+00:00"}
        RunDir(run_dir).lock.write_text(json.dumps(owner))
        before = RunDir(run_dir).summary.read_text()
        with pytest.raises(RunError, match=rf"being trained by process {other.pid} on .*wait for it to finish"):
            run_training(tiny_config(tmp_path), resume=str(run_dir), console=False)
        assert RunDir(run_dir).summary.read_text() == before  # the second writer wrote nothing
        assert json.loads(RunDir(run_dir).lock.read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
    resumed = run_training(tiny_config(tmp_path), resume=str(run_dir), console=False)  # its owner is gone
    assert resumed["status"] == "done"
    assert f"run.lock: took over from process {other.pid}" in RunDir(run_dir).log.read_text()
    assert not RunDir(run_dir).lock.exists()


# --- SIGINT and SIGTERM -----------------------------------------------------------------------

def test_a_signal_during_a_step_stops_after_it_with_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    common = ("train.iterations=6", *EXACT)
    straight = run_training(tiny_config(tmp_path, *common, "run.run_id=straight"), console=False)
    real_step = Trainer.train_step

    def signalled(self, scale):
        if self.step == 2:  # Ctrl-C arrives while the third step runs
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, scale)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(tmp_path, *common, "run.run_id=cut"), console=False)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "cut"
    summary = RunDir(run_dir).read_summary()
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "SIGINT"
    assert summary["checkpoint_step"] == 3 and f"pgolf train --resume {run_dir}" in summary["message"]
    assert RunDir(run_dir).latest_checkpoint().name == "step_0000003.pt"  # the whole step, default settings
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    assert not RunDir(run_dir).lock.exists()
    resumed = run_training(tiny_config(tmp_path), resume=str(run_dir), console=False)
    assert resumed["status"] == "done" and resumed["steps"] == 6
    assert resumed["roundtrip"]["val_bpb"] == straight["roundtrip"]["val_bpb"]
    assert _same_weights(_weights(run_dir, 6), _weights(tmp_path / "runs" / "straight", 6))


def test_an_interruption_that_cuts_a_step_short_saves_nothing(tmp_path, monkeypatch):
    """An exception out of a half-done step (weights updated, step not yet counted) must not be
    saved as if the step were whole."""
    real_step = Trainer.train_step

    def cut(self, scale):
        loss = real_step(self, scale)
        if self.step == 3:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(Trainer, "train_step", cut)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(tmp_path, "train.iterations=6", "train.checkpoint_every=2", *EXACT,
                                 "run.run_id=cut"), console=False)
    run_dir = tmp_path / "runs" / "cut"
    assert RunDir(run_dir).latest_checkpoint().name == "step_0000002.pt"
    assert RunDir(run_dir).read_summary()["checkpoint_step"] == 2


SLOW_TRAIN = """
import sys, time
from pgolf.train.trainer import Trainer
real_step = Trainer.train_step
def slow_step(self, scale):  # time for the test to send its signal mid-run; the numbers are unchanged
    time.sleep(0.1)
    return real_step(self, scale)
Trainer.train_step = slow_step
from pgolf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_and_signal(tmp_path: Path, run_id: str, signum: int, *extra: str,
                      options: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, Path]:
    """`pgolf train [options]` in a subprocess, sent signum once it has logged two steps."""
    args = ["train", *options, *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN, *extra, f"run.run_id={run_id}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    run_dir = tmp_path / "runs" / run_id
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not any(e.get("event") == "train" and e["step"] >= 2 for e in read_metrics(run_dir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir


def test_sigterm_checkpoints_marks_interrupted_and_resumes_exactly(tmp_path):
    from pgolf.lab.ledger import Ledger

    common = ("train.iterations=12", *EXACT)
    done, run_dir = _train_and_signal(tmp_path, "term", signal.SIGTERM, *common)
    assert done.returncode == 143, done.stderr  # 128 + SIGTERM (pgolf.rules.EXIT_TERMINATED)
    assert f"interrupted by SIGTERM; continue from step_" in done.stderr
    assert f"pgolf train --resume {run_dir}" in done.stderr
    summary = RunDir(run_dir).read_summary()
    reached = max(e["step"] for e in read_metrics(run_dir) if e["event"] == "train")
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "SIGTERM"
    assert 2 <= reached < 12 and summary["checkpoint_step"] == reached
    assert RunDir(run_dir).latest_checkpoint().name == f"step_{reached:07d}.pt"
    assert Ledger(tmp_path / "runs").get("term")["status"] == "interrupted"
    assert not RunDir(run_dir).lock.exists()

    resumed = run_training(tiny_config(tmp_path), resume=str(run_dir), console=False)
    straight = run_training(tiny_config(tmp_path, *common, "run.run_id=straight"), console=False)
    assert resumed["status"] == "done" and resumed["steps"] == 12
    assert resumed["pre_quant"]["val_loss"] == straight["pre_quant"]["val_loss"]
    assert _same_weights(_weights(run_dir, 12), _weights(tmp_path / "runs" / "straight", 12))


def test_sigint_exits_130_with_a_checkpoint(tmp_path):
    from pgolf.rules import EXIT_INTERRUPTED

    done, run_dir = _train_and_signal(tmp_path, "ctrl_c", signal.SIGINT, "train.iterations=12", *EXACT)
    assert done.returncode == EXIT_INTERRUPTED, done.stderr
    summary = RunDir(run_dir).read_summary()
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "SIGINT"
    assert RunDir(run_dir).latest_checkpoint().name == f"step_{summary['checkpoint_step']:07d}.pt"


# --- checkpoint retention ---------------------------------------------------------------------

def test_only_the_newest_checkpoints_are_kept_and_the_run_resumes(tmp_path):
    common = ("train.iterations=5", "train.checkpoint_every=1", "train.keep_checkpoints=2", *EXACT,
              "run.run_id=kept")
    run_training(tiny_config(tmp_path, *common), interrupt_at_step=4, console=False)
    run_dir = tmp_path / "runs" / "kept"
    assert _ckpt_names(run_dir) == ["step_0000003.opt0.pt", "step_0000003.pt", "step_0000004.opt0.pt",
                                    "step_0000004.pt"]
    assert run_training(tiny_config(tmp_path), resume=str(run_dir), console=False)["status"] == "done"
    assert _ckpt_names(run_dir) == ["step_0000004.opt0.pt", "step_0000004.pt", "step_0000005.opt0.pt",
                                    "step_0000005.pt"]


def test_pruning_spares_newer_parts_and_removes_every_rank_of_old_steps(tmp_path):
    from pgolf.train.checkpoint import prune_checkpoints

    names = ["step_0000001.pt", "step_0000001.opt0.pt", "step_0000001.opt1.pt",  # old, complete
             "step_0000000.opt1.pt",  # old, never completed
             "step_0000002.pt", "step_0000002.opt0.pt", "step_0000002.opt1.pt",
             "step_0000003.pt", "step_0000003.opt0.pt", "step_0000003.opt1.pt",
             "step_0000004.opt0.pt",  # being written by the ranks: no shared file yet
             "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert prune_checkpoints(tmp_path, 0) == []
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_0000000.opt1.pt", "step_0000001.opt0.pt",
                                               "step_0000001.opt1.pt", "step_0000001.pt"]
    assert removed[1].name == "step_0000001.pt"  # the shared file goes before its parts
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {p.name for p in removed})


def test_keep_checkpoints_is_validated(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.train.keep_checkpoints == 2
    cfg.train.keep_checkpoints = -1
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        validate(cfg)


@pytest.mark.slow
def test_sigterm_to_the_nproc_launcher_reaches_the_workers(tmp_path):
    """A scheduler signals `pgolf train --nproc N`, not its workers: the launcher passes SIGTERM
    on, the workers checkpoint and stop, and the launcher exits 143 as a single process would."""
    done, run_dir = _train_and_signal(tmp_path, "launched", signal.SIGTERM, "train.iterations=3000", *EXACT,
                                      options=("--nproc", "1"))
    assert done.returncode == 143, done.stderr[-2000:]
    summary = RunDir(run_dir).read_summary()
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "SIGTERM"
    assert RunDir(run_dir).latest_checkpoint().name == f"step_{summary['checkpoint_step']:07d}.pt"
