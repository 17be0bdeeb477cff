"""Run directories: `runs/<run_id>/` with the resolved config, metrics JSONL and a human log.

RunDir names every file in one; no other module spells them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pgolf.config import Config
from pgolf.runtime.files import atomic_write
from pgolf.runtime.processes import process_alive, this_process


class RunError(RuntimeError):
    """A run directory that cannot be created, found or resumed."""


STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# Every file of a step checkpoint: the shared step_XXXXXXX.pt and each rank's .opt<rank>.pt.
CHECKPOINT_FILE = re.compile(r"^step_(\d+)(?:\.opt\d+)?\.pt$")


class RunDir:
    """One run's directory and the names of the files in it:

      config.json     resolved config (all keys), the preset it came from, applied env vars
      metrics.jsonl   one JSON object per event (train, val, checkpoint, final, error)
      train.log       what was printed, with the same numbers
      checkpoints/    step_XXXXXXX.pt, with step_XXXXXXX.opt<rank>.pt beside each
      model.pgolf     the compressed artifact
      receipts/       evaluation receipts; roundtrip.json is the training's final score
      summary.json    the final numbers and the run's status
      run.lock        while a process trains the run: its pid, host and start time (RunLock)
    """

    CONFIG, METRICS, LOG, SUMMARY = "config.json", "metrics.jsonl", "train.log", "summary.json"
    CHECKPOINTS, RECEIPTS, ARTIFACT = "checkpoints", "receipts", "model.pgolf"
    ROUNDTRIP_RECEIPT = "roundtrip.json"
    LOCK = "run.lock"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def receipts(self) -> Path:
        return self.path / self.RECEIPTS

    @property
    def artifact(self) -> Path:
        return self.path / self.ARTIFACT

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def roundtrip_receipt(self) -> Path:
        return self.receipts / self.ROUNDTRIP_RECEIPT

    def is_run(self) -> bool:
        return self.config.is_file()

    def read_summary(self) -> dict:
        """summary.json, or {} while the run has none."""
        return read_json(self.summary) if self.summary.exists() else {}

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The step of any checkpoint file (shared or a rank's optimizer state), else None."""
    m = CHECKPOINT_FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (rank 0 writes step_XXXXXXX.pt last)."""
    steps = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).glob("step_*.pt") if (m := STEP_FILE.match(p.name)))
    return steps[-1][1] if steps else None


class RunLock:
    """run.lock: one process (rank 0) writes a run directory at a time.

    The file holds its owner's pid, host and kernel start time and is created with
    O_CREAT|O_EXCL, so of two processes starting at once only one gets it. A lock whose owner is
    gone (same host, the pid dead or reused) is taken over; one held from another host cannot
    be checked and is left to the user."""

    def __init__(self, path: Path, owner: dict, taken_over_from: dict | None = None):
        self.path, self.owner, self.taken_over_from = path, owner, taken_over_from

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        path = RunDir(run_dir).lock
        me = {**this_process(), "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        stale = None
        for _ in range(3):  # the owner may release or another process take over between our looks
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_lock(path)
                if owner is None:
                    continue  # released since open() saw it
                _refuse_if_held(run_dir, path, owner)
                # Its owner is gone. Remove it only if it is still the lock just judged: another
                # process may have taken it over since.
                if _read_lock(path) == owner:
                    path.unlink(missing_ok=True)
                stale = owner
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
            return cls(path, me, stale)
        raise RunError(f"could not take {path}: other processes keep taking it; check what is training {run_dir}")

    def release(self) -> None:
        """Remove run.lock if this process still holds it (never another process's)."""
        with contextlib.suppress(RunError):
            if _read_lock(self.path) == self.owner:
                self.path.unlink(missing_ok=True)

    def takeover_message(self) -> str | None:
        old = self.taken_over_from
        if old is None:
            return None
        return (f"run.lock: took over from process {old.get('pid')} on {old.get('host')} "
                f"(locked at {old.get('acquired_at')}), which is no longer running")


def _read_lock(path: Path) -> dict | None:
    """The lock's owner, or None when there is no lock. A file being written right now, or
    damaged, is refused: its owner cannot be told."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        if isinstance(owner, dict) and "pid" in owner:
            return owner
    except ValueError:
        pass
    raise RunError(f"{path} cannot be read (another process may be taking it right now); if no process is "
                   f"training this run, delete {path} and try again")


def _refuse_if_held(run_dir: Path, path: Path, owner: dict) -> None:
    """Raise RunError while the lock's owner may still be running."""
    pid, host = owner.get("pid"), owner.get("host")
    if host != this_process()["host"]:
        raise RunError(f"run {run_dir} is locked by process {pid} on host {host}, which cannot be checked from "
                       f"here; if that process is no longer running, delete {path} and try again")
    if process_alive(pid, owner.get("pid_start")):
        raise RunError(f"run {run_dir} is being trained by process {pid} on {host} (since "
                       f"{owner.get('acquired_at')}); wait for it to finish, or stop it (Ctrl-C, or `kill {pid}`: "
                       f"it saves a checkpoint) and then `pgolf train --resume {run_dir}`")


class RunHooks:
    """What the caller of a training or evaluation wants to be told (rank 0 only). Training and
    evaluation never import the lab: the CLI passes the ledger's hooks, a shipped bundle the
    default ones, which do nothing."""

    def run_started(self, run_dir: Path, device, world_size: int) -> None:
        pass

    def run_ended(self, run_dir: Path) -> None:
        """summary.json holds the outcome."""

    def eval_scored(self, run_dir: Path, kind: str, result: dict, stride: int) -> None:
        pass


def new_run_id(cfg: Config) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.run.name) or "run"
    return f"{stamp}-{name}-s{cfg.train.seed}"


def create_run_dir(cfg: Config) -> Path:
    """Create a fresh run directory; never reuse or overwrite an existing one."""
    runs_dir = Path(cfg.run.runs_dir)
    explicit = bool(cfg.run.run_id)
    run_id = cfg.run.run_id or new_run_id(cfg)
    path = runs_dir / run_id
    suffix = 1
    while not explicit and path.exists():  # two runs started in the same second
        suffix += 1
        path = runs_dir / f"{run_id}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise RunError(
            f"run directory {path} already exists and is never overwritten; "
            f"continue it with `pgolf train --resume {path}` or choose another run.run_id"
        ) from None
    RunDir(path).checkpoints.mkdir()
    return path


def find_run_dir(run: str, runs_dir: str = "runs") -> Path:
    for candidate in (Path(run), Path(runs_dir) / run):
        if RunDir(candidate).is_run():
            return candidate
    raise RunError(f"no run found at '{run}' (looked for {run}/{RunDir.CONFIG} and {runs_dir}/{run}/{RunDir.CONFIG})")


def group_run_dirs(group: str, runs_dir: str | Path = "runs") -> list[Path]:
    """Run directories whose resolved config has run.group == group, oldest first."""
    found = []
    for config_path in sorted(Path(runs_dir).glob(f"*/{RunDir.CONFIG}")):
        try:
            run_cfg = read_json(config_path).get("config", {}).get("run", {})
        except (OSError, ValueError):
            continue  # a run being created right now, or a damaged one: not part of any group
        if run_cfg.get("group") == group:
            found.append(config_path.parent)
    return found


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically so a killed process never leaves a half-written file."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class RunLogger:
    """Prints on rank 0 and appends the same lines to train.log; events go to metrics.jsonl."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, console: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.console = console
        self.status_hook = None  # set by a progress display to print above its bar
        if enabled and run_dir is not None:
            for path in (RunDir(run_dir).metrics, RunDir(run_dir).log):
                _end_with_newline(path)

    def log(self, message: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console and self.console:
            (self.status_hook or print)(message)
        if self.run_dir is not None:
            with open(RunDir(self.run_dir).log, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled or self.run_dir is None:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        with open(RunDir(self.run_dir).metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def error(self, message: str) -> None:
        self.event("error", message=message)
        if self.enabled:
            print(message, file=sys.stderr)
            if self.run_dir is not None:
                with open(RunDir(self.run_dir).log, "a", encoding="utf-8") as f:
                    f.write("ERROR: " + message + "\n")


def _end_with_newline(path: Path) -> None:
    """A process killed mid-write leaves a partial last line; later records start afresh."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's events; a line cut short by a killed process is skipped."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
