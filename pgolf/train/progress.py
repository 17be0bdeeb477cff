"""Training progress: a live bar on an interactive terminal; off a terminal (output piped to a
file), a plain progress line at least every train.progress_every_seconds of wall time."""

from __future__ import annotations

import sys
import time


class TrainProgress:
    """Shows step, loss and elapsed training time; log lines print above the bar.

    Off a terminal it logs "progress: step S/N loss L tokens/s T eta E" lines instead, from the
    values the loop already has (the loss it read, the shared clock): no extra device work."""

    def __init__(self, total_steps: int, enabled: bool, logger=None, every_seconds: float = 0.0,
                 batch_tokens: int = 0, cap_ms: float | None = None, start_step: int = 0, start_ms: float = 0.0):
        tty = sys.stdout.isatty()
        self.enabled = enabled and tty
        self.lines = enabled and not tty and every_seconds > 0 and logger is not None
        self.total = total_steps
        self.logger = logger
        self.every_seconds = every_seconds
        self.batch_tokens = batch_tokens
        self.cap_ms = cap_ms
        self.start_step, self.start_ms = start_step, start_ms
        self._last_line = time.monotonic()
        self._progress = None
        self._task = None

    def __enter__(self) -> "TrainProgress":
        self._last_line = time.monotonic()
        if self.enabled:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:  # rich is optional: a bundled train_gpt.py runs without it
                return self

            self._progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, info="")
            if self.logger is not None:
                self.logger.status_hook = self._progress.console.print
        return self

    def update(self, step: int, loss: float, train_ms: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step,
                                  info=f"loss {loss:.4f}  {train_ms / max(step, 1):.1f} ms/step")
        if self.lines and time.monotonic() - self._last_line >= self.every_seconds:
            self._last_line = time.monotonic()
            self.logger.log(self.line(step, loss, train_ms))

    def line(self, step: int, loss: float, train_ms: float) -> str:
        steps, ms = step - self.start_step, train_ms - self.start_ms
        ms_per_step = ms / steps if steps > 0 else 0.0
        tokens_per_s = steps * self.batch_tokens / (ms / 1000.0) if ms > 0 else 0.0
        remaining_ms = max(self.total - step, 0) * ms_per_step
        if self.cap_ms is not None:
            remaining_ms = min(remaining_ms, max(self.cap_ms - train_ms, 0.0))
        return (f"progress: step {step}/{self.total} loss {loss:.4f} tokens/s {tokens_per_s:,.0f} "
                f"eta {_duration(remaining_ms / 1000.0)} train_time:{train_ms:.0f}ms")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            if self.logger is not None:
                self.logger.status_hook = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
