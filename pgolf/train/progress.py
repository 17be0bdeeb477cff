"""A live progress bar for training on an interactive terminal; silent otherwise."""

from __future__ import annotations

import sys


class TrainProgress:
    """Shows step, loss and elapsed training time; log lines print above the bar."""

    def __init__(self, total_steps: int, enabled: bool, logger=None):
        self.enabled = enabled and sys.stdout.isatty()
        self.total = total_steps
        self.logger = logger
        self._progress = None
        self._task = None

    def __enter__(self) -> "TrainProgress":
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

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            if self.logger is not None:
                self.logger.status_hook = None
