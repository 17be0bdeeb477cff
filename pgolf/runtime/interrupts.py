"""SIGINT and SIGTERM as one interruption: both raise Interrupted (a KeyboardInterrupt), which
the training loop can hold back while a step is half done."""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal (Ctrl-C is SIGINT; schedulers send SIGTERM)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # as shells report a process ended by that signal


class InterruptGuard:
    """While entered (main thread only: Python runs handlers there), SIGINT and SIGTERM raise
    Interrupted; on exit the previous handlers return. Inside `deferred()` a signal is only
    recorded in `pending`, for the caller to act on once its state is whole again. Never
    entered, it records nothing: `pending` stays None."""

    def __init__(self):
        self.pending: int | None = None
        self._defer_depth = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self._defer_depth:
            self.pending = self.pending or signum  # the first signal decides the exit status
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self._defer_depth += 1
        try:
            yield
        finally:
            self._defer_depth -= 1

    def take_pending(self) -> int | None:
        signum, self.pending = self.pending, None
        return signum
