"""Run directories: the run lock (one writer per run directory)."""

import json
import subprocess
import sys

import pytest

from pgolf.runs import RunDir, RunError, RunLock
from pgolf.runtime.processes import process_start_time, this_process


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, **owner):
    RunDir(run_dir).lock.write_text(json.dumps({"acquired_at": "2025-01-01T00:00:00+00:00", **owner}))


def test_lock_holds_the_owner_and_refuses_a_second_writer(tmp_path):
    lock = RunLock.acquire(tmp_path)
    owner = json.loads(RunDir(tmp_path).lock.read_text())
    me = this_process()
    assert {k: owner[k] for k in ("pid", "host", "pid_start")} == me and lock.taken_over_from is None
    with pytest.raises(RunError, match=rf"being trained by process {me['pid']} on {me['host']}.*--resume"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert not RunDir(tmp_path).lock.exists()
    RunLock.acquire(tmp_path).release()  # free again


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, host=this_process()["host"], pid_start="1")
    lock = RunLock.acquire(tmp_path)
    assert lock.taken_over_from["pid"] == dead
    assert f"took over from process {dead}" in lock.takeover_message()
    assert json.loads(RunDir(tmp_path).lock.read_text())["pid"] == this_process()["pid"]
    lock.release()


def test_a_reused_pid_is_not_the_owner(tmp_path):
    """Same pid, another start time: the pid was reused by an unrelated process."""
    _write_lock(tmp_path, pid=this_process()["pid"], host=this_process()["host"], pid_start="12345-not-mine")
    if not process_start_time(this_process()["pid"]):
        pytest.skip("process start times need /proc")
    RunLock.acquire(tmp_path).release()


def test_lock_from_another_host_is_left_to_the_user(tmp_path):
    _write_lock(tmp_path, pid=1, host="elsewhere.example", pid_start="1")
    with pytest.raises(RunError, match=r"locked by process 1 on host elsewhere.example.*delete .*run.lock"):
        RunLock.acquire(tmp_path)


def test_release_never_removes_another_owners_lock(tmp_path):
    lock = RunLock.acquire(tmp_path)
    _write_lock(tmp_path, pid=1, host="elsewhere.example", pid_start="1")  # taken over meanwhile
    lock.release()
    assert RunDir(tmp_path).lock.exists()


def test_unreadable_lock_is_refused_with_the_fix(tmp_path):
    RunDir(tmp_path).lock.write_text("")
    with pytest.raises(RunError, match="cannot be read.*delete"):
        RunLock.acquire(tmp_path)
