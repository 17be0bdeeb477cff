"""The challenge's fixed numbers and pgolf's exit statuses: one definition each, torch-free."""

from __future__ import annotations

SIZE_CAP_BYTES = 16_000_000  # artifact + counted code, decimal bytes, as the challenge counts
TRACK_TIME_LIMIT_S = 600.0  # the record track's training budget (8 x H100)
EVAL_TIME_LIMIT_S = 600.0  # and its evaluation budget
# A step is 8 micro-batches whatever the process count: N ranks accumulate 8 // N each.
MICRO_BATCHES = 8

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OVER_CAP = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by a scheduler or `kill`, checkpointed like Ctrl-C
# The one table of exit statuses: every pgolf command returns one of these. `pgolf --help` prints
# it and README.md ("Runs") holds the same rows (tests/test_cli.py compares them).
EXIT_CODES = {
    EXIT_OK: "success (a run done, a plan that fits, an audit OK)",
    EXIT_FAILED: "failed: an error, a failed audit, a refused submission",
    EXIT_USAGE: "bad usage or config, refused before anything ran",
    EXIT_OVER_CAP: "artifact (or a plan's prediction) over the 16,000,000-byte cap",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C (also through --nproc)",
    EXIT_TERMINATED: "terminated by SIGTERM (a scheduler or kill), checkpointed like Ctrl-C",
}
# A finished run's summary status -> the exit status of `pgolf train` and of a shipped train_gpt.py.
STATUS_EXIT_CODES = {"done": EXIT_OK, "over_cap": EXIT_OVER_CAP, "interrupted": EXIT_INTERRUPTED}


def summary_exit_code(summary: dict) -> int:
    """The exit status a run's summary.json stands for (as `pgolf train` itself would exit)."""
    if summary.get("status") == "interrupted" and summary.get("stop_reason") == "SIGTERM":
        return EXIT_TERMINATED
    return STATUS_EXIT_CODES.get(summary.get("status"), EXIT_FAILED)

