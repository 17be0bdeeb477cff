"""Checks `pgolf train` and `pgolf run` make before building anything: the planner's fast lower
bound on the artifact (refuse an over-cap config, exit 3), and a fair CPU thread count when other
pgolf runs train on the same host (run.threads)."""

import os
import socket
import time

import pytest
import torch

from pgolf.cli import main as cli_main
from pgolf.config.resolve import resolve_config
from pgolf.lab import plan as plan_mod
from pgolf.lab.ledger import Ledger, live_runs_on_host
from pgolf.lab.plan import fast_size_bound, size_gate, smallest_export_bits
from pgolf.rules import EXIT_OK, EXIT_OVER_CAP, SIZE_CAP_BYTES
from pgolf.runs import RunDir
from pgolf.runtime.processes import process_start_time
from pgolf.train.run import available_cores, thread_count
from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides

BIG = ["model.num_layers=30", "model.model_dim=1024"]  # ~221M parameters: far over the cap at any export
FAST = ["model.num_layers=2", "train.iterations=2", "train.val_loss_every=0", "train.warmup_steps=0"]


# --- the fast size bound ------------------------------------------------------------------------

def test_the_bound_of_a_big_config_is_over_the_cap_and_quick():
    cfg, _ = resolve_config("baseline", BIG)
    start = time.perf_counter()
    bound = fast_size_bound(cfg)
    assert time.perf_counter() - start < 30
    assert bound["params"] > 200_000_000 and not bound["fits"] and bound["overage"] > 0
    assert any("export.scheme=int6" in lever for lever in bound["levers"])
    assert any("model.num_layers" in lever for lever in bound["levers"])


def test_the_baseline_is_not_refused_and_its_bound_is_below_its_real_artifact():
    cfg, _ = resolve_config("baseline", [])
    bound = fast_size_bound(cfg)
    assert bound["fits"] and not bound["near_cap"]
    # The baseline's real int8 + zlib artifact is ~15.8 MB; a lower bound stays well below it.
    assert bound["total_bytes"] < 0.7 * SIZE_CAP_BYTES
    assert size_gate(cfg, force=False) is None


def test_a_short_run_is_never_refused_its_weights_barely_move():
    cfg, _ = resolve_config("baseline", [*BIG, "train.iterations=50"])
    bound = fast_size_bound(cfg)
    assert bound["fits"] and bound["model_bytes"] == 0


def test_the_bound_uses_the_smallest_width_the_export_can_reach():
    assert smallest_export_bits(resolve_config("baseline", [])[0]) == 8
    assert smallest_export_bits(resolve_config("baseline", ["export.scheme=int6"])[0]) == 6
    assert smallest_export_bits(resolve_config("baseline", ["export.scheme=int6", "export.policy=mlp:3"])[0]) == 3
    assert smallest_export_bits(resolve_config("baseline", ["export.allocate=true"])[0]) == 4


def test_train_refuses_an_over_cap_config_before_creating_its_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    start = time.perf_counter()
    code = cli_main(["train", "--config", "baseline", *BIG, f"run.runs_dir={runs}"])
    assert code == EXIT_OVER_CAP and time.perf_counter() - start < 30
    assert not runs.exists()
    err = capsys.readouterr().err
    assert "cannot fit" in err and "lower bound" in err and "--force" in err
    assert "export.scheme=int6" in err and "export.compressor=auto" in err


def test_run_seeds_refuses_an_over_cap_config_before_the_first_seed(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = cli_main(["run", "baseline", "--seeds", "1,2", *BIG, f"run.runs_dir={runs}"])
    assert code == EXIT_OVER_CAP and not runs.exists()
    assert "pgolf run: this config cannot fit" in capsys.readouterr().err


def test_force_trains_anyway_and_a_near_cap_bound_warns(capsys):
    big, _ = resolve_config("baseline", BIG)
    assert size_gate(big, force=True) is None
    assert "--force: training anyway" in capsys.readouterr().err
    base, _ = resolve_config("baseline", [])
    near = {**fast_size_bound(base), "total_bytes": SIZE_CAP_BYTES - 1000, "near_cap": True}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_mod, "fast_size_bound", lambda cfg: near)
        assert size_gate(base, force=False) is None
    assert "warning" in capsys.readouterr().err


def test_force_on_the_command_line_passes_the_check(tmp_path, monkeypatch, one_cpu_thread, capsys):
    over = {"params": 1, "bits": 8, "compression_floor": 0.5, "model_bytes": SIZE_CAP_BYTES, "code_bytes": 1,
            "total_bytes": SIZE_CAP_BYTES + 1, "cap": SIZE_CAP_BYTES, "fits": False, "overage": 1,
            "near_cap": False, "levers": ["a smaller model"]}
    monkeypatch.setattr(plan_mod, "fast_size_bound", lambda cfg: over)
    args = ["train", *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN, *FAST]
    assert cli_main(args) == EXIT_OVER_CAP and not (tmp_path / "runs").exists()
    assert cli_main([*args, "--force"]) == EXIT_OK
    assert len(list((tmp_path / "runs").iterdir())) >= 1


# --- threads shared among live runs ---------------------------------------------------------

def _fake_live_run(runs_dir, run_id="other-run", pid=None):
    pid = pid or os.getpid()  # a live process on this host stands in for another training run
    Ledger(runs_dir).upsert(run_id, status="running", hostname=socket.gethostname(), pid=pid,
                            pid_start=process_start_time(pid), run_dir=str(runs_dir / run_id))


def test_thread_count_rule():
    assert thread_count(0, 0, 16) is None  # alone: torch's default, untouched
    assert thread_count(0, 1, 16) == 8 and thread_count(0, 3, 16) == 4
    assert thread_count(0, 20, 16) == 1
    assert thread_count(3, 5, 16) == 3 and thread_count(3, 0, 16) == 3


def test_live_runs_count_only_running_alive_rows_on_this_host(tmp_path):
    runs = tmp_path / "runs"
    assert live_runs_on_host(runs) == 0
    _fake_live_run(runs)
    _fake_live_run(runs, "dead-run", pid=2 ** 22 + 12345)  # no such process: reconciled to killed
    Ledger(runs).upsert("elsewhere", status="running", hostname="another-host", pid=os.getpid())
    Ledger(runs).upsert("finished", status="done", hostname=socket.gethostname(), pid=os.getpid())
    assert live_runs_on_host(runs) == 1
    assert live_runs_on_host(runs, exclude="other-run") == 0


def test_train_divides_the_threads_among_live_runs_and_logs_it(tmp_path, one_cpu_thread):
    _fake_live_run(tmp_path / "runs")
    args = ["train", *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN, *FAST, "run.run_id=shared"]
    assert cli_main(args) == EXIT_OK
    expected = max(1, available_cores() // 2)
    log = RunDir(tmp_path / "runs" / "shared").log.read_text(encoding="utf-8")
    assert f"threads: {expected} (1 other pgolf runs training on this host; auto" in log
    assert torch.get_num_threads() == expected


def test_run_threads_is_honoured(tmp_path, one_cpu_thread):
    args = ["train", *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN, *FAST, "run.run_id=fixed",
            "run.threads=2"]
    assert cli_main(args) == EXIT_OK
    log = RunDir(tmp_path / "runs" / "fixed").log.read_text(encoding="utf-8")
    assert "threads: 2 (0 other pgolf runs training on this host; run.threads" in log
    assert torch.get_num_threads() == 2
