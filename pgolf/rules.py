"""The challenge's fixed numbers and pgolf's exit statuses: one definition each, torch-free."""

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
# A finished run's summary status -> the exit status of `pgolf train` and of a shipped train_gpt.py.
STATUS_EXIT_CODES = {"done": EXIT_OK, "over_cap": EXIT_OVER_CAP, "interrupted": EXIT_INTERRUPTED}
