"""The results ledger: one row per run in `<runs_dir>/ledger.sqlite`, written by the runs themselves.

Why SQLite (stdlib `sqlite3`) rather than an append-only JSONL: a run's row changes as the run
goes (running -> done, then sliding / TTT scores from `pgolf eval`), and SQLite updates it in
place inside a transaction; concurrent writers are serialized by SQLite's own file lock (WAL
journal + a busy timeout, so readers never block a writing run), and a process killed mid-write
leaves the database consistent (the unfinished transaction is rolled back). A JSONL store would
need its own locking, a "last record wins" merge on every read and periodic compaction.
Keep `runs/` on a local disk: SQLite's locking is unreliable on some network file systems.

A run killed with SIGKILL cannot say so; its row stays `running` with the pid and host that
wrote it. Reads reconcile such rows: a run whose summary.json reached a final status takes it,
and one whose process is gone (same host) is reported and stored as `killed`.

The config hash identifies an experiment: sha256 of the canonical JSON of the resolved config's
keys that differ from pgolf's defaults (so adding a new switch, off by default, does not change
old hashes), leaving out LABEL_KEYS: names and locations (run.*), logging and checkpoint cadence,
and the seed (stored on its own, so the seeds of one config share a hash).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pgolf.config import Config, ConfigError
from pgolf.config.resolve import resolve_config
from pgolf.rules import EXIT_OK
from pgolf.runs import RunDir, RunHooks, read_json, write_json
from pgolf.runtime.processes import process_alive, process_start_time

LEDGER_NAME = "ledger.sqlite"
# Keys that label a run or set its logging/checkpoint cadence without changing what it learns.
LABEL_KEYS = frozenset({"run.run_id", "run.name", "run.group", "run.runs_dir", "run.threads", "train.seed",
                        "train.train_log_every", "train.checkpoint_every"})
FINAL_STATUSES = ("done", "over_cap", "failed", "interrupted", "killed")
SCORED_STATUSES = ("done", "over_cap")  # runs that produced an artifact and a roundtrip score

COLUMNS: dict[str, str] = {
    "run_id": "TEXT PRIMARY KEY", "run_dir": "TEXT", "group_id": "TEXT", "preset": "TEXT",
    "config_hash": "TEXT", "config_diff": "TEXT", "seed": "INTEGER", "tokenizer": "TEXT",
    "git_commit": "TEXT", "device": "TEXT", "world_size": "INTEGER", "hostname": "TEXT", "pid": "INTEGER",
    "pid_start": "TEXT", "status": "TEXT", "stop_reason": "TEXT", "steps": "INTEGER", "train_time_ms": "REAL",
    "pre_val_loss": "REAL", "pre_val_bpb": "REAL", "val_loss": "REAL", "val_bpb": "REAL",
    "sliding_val_loss": "REAL", "sliding_val_bpb": "REAL", "sliding_stride": "INTEGER",
    "ttt_val_loss": "REAL", "ttt_val_bpb": "REAL", "artifact_bytes": "INTEGER", "total_bytes": "INTEGER",
    "started_at": "TEXT", "updated_at": "TEXT", "error": "TEXT",
}
BUSY_TIMEOUT_S = 60.0


def ledger_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / LEDGER_NAME


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """The ledger of one runs directory. Every method opens its own short connection."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self.path = ledger_path(runs_dir)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._ensure_schema(conn)
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS runs (" + ", ".join(f"{c} {t}" for c, t in COLUMNS.items()) + ")")
        have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        for column, kind in COLUMNS.items():  # a ledger written by an older pgolf gains new columns
            if column not in have:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def upsert(self, run_id: str, **fields: Any) -> None:
        """Insert the run or update only the given fields of its row, atomically."""
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown ledger fields: {', '.join(sorted(unknown))}")
        fields = {**fields, "updated_at": _now()}
        names = list(fields)
        sql = (f"INSERT INTO runs (run_id, {', '.join(names)}) VALUES (?, {', '.join('?' for _ in names)}) "
               f"ON CONFLICT(run_id) DO UPDATE SET {', '.join(f'{n}=excluded.{n}' for n in names)}")
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, [run_id, *(fields[n] for n in names)])
            conn.execute("COMMIT")

    def get(self, run_id: str) -> dict | None:
        rows = self._select("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def rows(self, group: str | None = None) -> list[dict]:
        """All rows (or one group's), oldest first, with killed runs reconciled."""
        if group is None:
            return self._select("SELECT * FROM runs ORDER BY started_at, run_id", ())
        return self._select("SELECT * FROM runs WHERE group_id = ? ORDER BY started_at, run_id", (group,))

    def groups(self) -> list[str]:
        return [r["group_id"] for r in self._select(
            "SELECT group_id, MIN(started_at) AS first FROM runs WHERE group_id != '' "
            "GROUP BY group_id ORDER BY first", ())]

    def _select(self, sql: str, params: tuple) -> list[dict]:
        if not self.path.exists():
            return []
        with self._connect() as conn:
            rows = [dict(r) for r in conn.execute(sql, params)]
        return [self._reconcile(r) for r in rows]

    def _reconcile(self, row: dict) -> dict:
        """A row left `running` by a process that is gone: take summary.json's outcome, else `killed`."""
        if row.get("status") != "running":
            return row
        run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
        summary = _read_summary(run_dir) if run_dir is not None else {}
        if summary.get("status") in FINAL_STATUSES:
            try:
                fields = _fields_from_run_dir(run_dir)
            except (OSError, ValueError, KeyError):  # its config.json is gone or damaged: the outcome alone
                fields = {"status": summary["status"]}
        elif row.get("hostname") == socket.gethostname() and not process_alive(row.get("pid"), row.get("pid_start")):
            fields = {"status": "killed", "error": "the process stopped without recording an outcome (killed?)"}
        else:
            return row  # still running, or on another host where its process cannot be checked
        self.upsert(row["run_id"], **fields)
        return {**row, **fields}


# --- what a run records -----------------------------------------------------------------------

def flat_config(cfg_dict: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg_dict.items() for key, value in values.items()}


def _experiment_keys(cfg_dict: dict, reference: dict) -> dict[str, Any]:
    """Keys of cfg_dict whose values differ from reference, minus LABEL_KEYS."""
    flat, ref = flat_config(cfg_dict), flat_config(reference)
    return {k: v for k, v in sorted(flat.items()) if k not in LABEL_KEYS and (k not in ref or ref[k] != v)}


def config_hash(cfg_dict: dict) -> str:
    canonical = json.dumps(_experiment_keys(cfg_dict, Config().to_dict()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def config_diff(cfg_dict: dict, preset: str | None) -> dict[str, Any]:
    """Keys whose resolved values differ from the preset's (from the defaults without a preset)."""
    reference = Config().to_dict()
    if preset:
        with contextlib.suppress(ConfigError, OSError):  # a preset since removed: diff against the defaults
            reference = resolve_config(preset, [], env={})[0].to_dict()
    return _experiment_keys(cfg_dict, reference)


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the repository holding this package, or "unknown" (never fails)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=False)
        commit = out.stdout.strip()
        return commit if out.returncode == 0 and commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_summary(run_dir: Path) -> dict:
    try:
        return read_json(RunDir(run_dir).summary)
    except (OSError, ValueError):
        return {}


def _fields_from_run_dir(run_dir: Path) -> dict[str, Any]:
    """Ledger fields from a run directory's config.json and summary.json."""
    saved = read_json(RunDir(run_dir).config)
    cfg_dict, preset = saved["config"], saved.get("preset")
    summary = _read_summary(run_dir)
    pre, rt, size = summary.get("pre_quant") or {}, summary.get("roundtrip") or {}, summary.get("size") or {}
    fields = {
        "run_dir": str(run_dir.resolve()), "group_id": cfg_dict["run"].get("group", ""), "preset": preset or "",
        "config_hash": config_hash(cfg_dict), "config_diff": json.dumps(config_diff(cfg_dict, preset)),
        "seed": cfg_dict["train"]["seed"], "tokenizer": Path(str(cfg_dict["data"]["tokenizer_path"])).name,
        "steps": summary.get("steps"), "train_time_ms": summary.get("train_time_ms"),
        "stop_reason": summary.get("stop_reason"), "error": summary.get("error"),
        "pre_val_loss": pre.get("val_loss"), "pre_val_bpb": pre.get("val_bpb"),
        "val_loss": rt.get("val_loss"), "val_bpb": rt.get("val_bpb"),
        "artifact_bytes": size.get("model_bytes"), "total_bytes": size.get("total_bytes"),
    }
    if summary.get("status"):
        fields["status"] = summary["status"]
    return fields


def describe_device(device) -> str:
    if getattr(device, "type", None) == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def record_run_start(run_dir: Path, device, world_size: int) -> None:
    """Called by the training process (rank 0) once its run directory and config exist."""
    def write() -> None:
        fields = {**_fields_from_run_dir(run_dir), "status": "running", "error": None, "git_commit": git_commit(),
                  "device": describe_device(device), "world_size": world_size, "hostname": socket.gethostname(),
                  "pid": os.getpid(), "pid_start": process_start_time(os.getpid()), "started_at": _now()}
        Ledger(run_dir.parent).upsert(run_dir.name, **fields)

    _never_fail(write)


def record_run_end(run_dir: Path) -> None:
    """Called by the training process (rank 0) after summary.json holds the outcome."""
    _never_fail(lambda: Ledger(run_dir.parent).upsert(run_dir.name, **_fields_from_run_dir(run_dir)))


def record_eval(run_dir: Path, kind: str, result: dict, stride: int) -> None:
    """Store a `pgolf eval` score of a run's artifact when it covers the same targets as the run's
    roundtrip score (so the numbers compare); other evaluations (prefixes) are not recorded."""
    summary = _read_summary(run_dir)
    if kind not in ("sliding", "ttt") or result.get("tokens") != summary.get("val_tokens_scored"):
        return
    fields = {f"{kind}_val_loss": result["val_loss"], f"{kind}_val_bpb": result["val_bpb"]}
    if kind == "sliding":
        fields["sliding_stride"] = stride

    def write() -> None:
        ensure_run(run_dir)
        Ledger(run_dir.parent).upsert(run_dir.name, **fields)

    _never_fail(write)


def ensure_run(run_dir: Path) -> dict:
    """The run's ledger row, importing the run directory first when the ledger lacks it
    (runs made before the ledger existed, or copied from another machine)."""
    ledger = Ledger(run_dir.parent)
    row = ledger.get(run_dir.name)
    if row is None:
        fields = {"status": "unknown", **_fields_from_run_dir(run_dir), "started_at": _started_at(run_dir),
                  "git_commit": "unknown"}
        if fields["status"] == "running":  # a live run registers itself, so this one stopped unrecorded
            fields.update(status="killed", error="summary.json says running, but no process registered it")
        ledger.upsert(run_dir.name, **fields)
        row = ledger.get(run_dir.name)
    return row


def move_to_group(run_dir: Path, group: str) -> None:
    """Relabel a run's group in its config.json and the ledger (run.group is a label: the config
    hash does not change). A sweep moves an abandoned attempt out of its experiment's group."""
    saved = read_json(RunDir(run_dir).config)
    saved["config"]["run"]["group"] = group
    write_json(RunDir(run_dir).config, saved)
    ensure_run(run_dir)
    Ledger(run_dir.parent).upsert(run_dir.name, group_id=group)


def _started_at(run_dir: Path) -> str:
    stamp = RunDir(run_dir).config.stat().st_mtime
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")


def _never_fail(write) -> None:
    """The ledger records runs; failing to write it must never fail the run itself."""
    try:
        write()
    except (sqlite3.Error, OSError, ValueError, KeyError) as exc:
        print(f"warning: could not update the run ledger: {exc}", file=sys.stderr)


# --- `pgolf ledger` -----------------------------------------------------------------------------

LIST_COLUMNS = ("run_id", "group_id", "seed", "status", "steps", "val_bpb", "pre_val_bpb", "sliding_val_bpb",
                "ttt_val_bpb", "total_bytes", "config_hash", "git_commit")


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def scan_runs(runs_dir: Path) -> int:
    """Import run directories the ledger does not know yet; returns how many were added."""
    ledger, added = Ledger(runs_dir), 0
    for config_path in sorted(Path(runs_dir).glob("*/config.json")):
        if ledger.get(config_path.parent.name) is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                ensure_run(config_path.parent)
                added += 1
    return added


def live_runs_on_host(runs_dir: str | Path, exclude: str | None = None) -> int:
    """Other pgolf runs training now on this host: ledger rows `running` whose process is alive
    (rows() reconciles dead ones to killed). `exclude`: a run id not to count (the run itself)."""
    host = socket.gethostname()
    try:
        rows = Ledger(runs_dir).rows()
    except sqlite3.Error:
        return 0  # an unreadable ledger must not stop a run; the thread count stays torch's default
    return sum(1 for r in rows if r.get("status") == "running" and r.get("hostname") == host
               and r.get("run_id") != exclude and process_alive(r.get("pid"), r.get("pid_start")))


def cmd_ledger(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    if args.scan:
        print(f"imported {scan_runs(runs_dir)} run directories into {ledger_path(runs_dir)}", file=sys.stderr)
    rows = Ledger(runs_dir).rows(args.group)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        where = f"group '{args.group}' in " if args.group else ""
        print(f"no runs in {where}{ledger_path(runs_dir)} (runs register themselves; `--scan` imports older ones)")
        return EXIT_OK
    short = [{**r, "config_hash": (r["config_hash"] or "")[:10], "git_commit": (r["git_commit"] or "")[:10]}
             for r in rows]
    print(format_table(list(LIST_COLUMNS), [[r[c] for c in LIST_COLUMNS] for r in short]))
    return EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("ledger", help="list the runs recorded in the results ledger")
    p.add_argument("--group", default=None, help="only the runs of this group")
    p.add_argument("--runs-dir", default="runs", help="the runs directory holding ledger.sqlite (default runs)")
    p.add_argument("--scan", action="store_true", help="first import run directories the ledger does not know")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=cmd_ledger)


class LedgerHooks(RunHooks):
    """Records runs and their scores in the ledger of the runs directory."""

    def run_started(self, run_dir: Path, device, world_size: int) -> None:
        record_run_start(run_dir, device, world_size)

    def run_ended(self, run_dir: Path) -> None:
        record_run_end(run_dir)

    def eval_scored(self, run_dir: Path, kind: str, result: dict, stride: int) -> None:
        record_eval(run_dir, kind, result, stride)

