"""Whether a process recorded earlier (pid, host, kernel start time) is still running."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_start_time(pid: int) -> str:
    """The kernel's start time of pid (Linux; "" elsewhere), so a reused pid is not mistaken
    for the process that was recorded."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_alive(pid: int | None, start: str | None = None) -> bool:
    """pid exists on this host and, when start is known, is the process that had that start time."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start:
        current = process_start_time(pid)
        return current == "" or current == start
    return True


def this_process() -> dict:
    """The identity process_alive checks: pid, host and start time of the calling process."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_start": process_start_time(pid)}
